"""What evaluate prints as it goes: each system's quality and speed, the cascade chosen on
validation, the headline."""

from __future__ import annotations

from tqdm.auto import tqdm


def print_cascade(casc: dict, reference: str) -> None:
    chosen = casc["chosen"]
    head = (f"evaluate: cascade ({casc['student']} -> {casc['teacher']}, "
            f"{casc['confidence']}) ")
    if not chosen:
        print(head + f"reaches no threshold for target {casc['target_accuracy']:.4f} on "
                     "validation")
        return
    measured = (f", measured {chosen['measured_ms_per_example']:.3f} ms/ex "
                f"({chosen['measured_speedup_vs_best_teacher']:.2f}x {reference})"
                if "measured_ms_per_example" in chosen else "")
    print(head + f"threshold {chosen['threshold']:.2f} (chosen on validation): test acc "
                 f"{chosen['accuracy']:.4f}, {100 * chosen['deferred_fraction']:.1f}% deferred, "
                 f"cost model {chosen['expected_ms_per_example']:.3f} ms/ex "
                 f"({chosen['speedup_vs_best_teacher']:.2f}x {reference}){measured}")


def print_systems(results: dict[str, dict]) -> None:
    for name, r in results.items():
        v = r["validation"]
        tqdm.write(f"evaluate: {name:<24} val {v['accuracy']:.4f} test {r['accuracy']:.4f} "
                   f"[{r['accuracy_ci'][0]:.4f}, {r['accuracy_ci'][1]:.4f}]  model "
                   f"{r['model_throughput_per_s']:.1f} ex/s  e2e {r['throughput_per_s']:.1f} "
                   f"ex/s  tokenize {r['tokenize_ms_per_example']:.3f} ms/ex  "
                   f"{r['size_mb']:.1f} MB")


def print_headline(metrics: dict) -> None:
    h = metrics["headline"]
    print(f"evaluate: {h['student']} (chosen on validation, {h['validation_accuracy']:.4f}) "
          f"runs {h['throughput_vs_best_teacher']:.2f}x the best teacher runtime "
          f"({h['best_teacher']}) end to end, {h['model_throughput_vs_best_teacher']:.2f}x in "
          f"model time; test accuracy {h['accuracy']:.4f}, {100 * h['accuracy_diff']:+.2f} pt "
          f"[{100 * h['accuracy_diff_ci'][0]:+.2f}, {100 * h['accuracy_diff_ci'][1]:+.2f}]")
