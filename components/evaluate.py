"""evaluate: every system on the same splits, quality and cost side by side, with intervals.

Systems: the teacher as a user would deploy it without distilling (`teacher` PyTorch eager,
`teacher_onnx` ONNX Runtime FP32, `teacher_onnx_int8` ONNX Runtime dynamic INT8,
`teacher_onnx_static_int8` static INT8) and every student artifact (`student` PyTorch,
`student_onnx`, `student_onnx_int8`, `student_onnx_static_int8`, TensorRT engines where they
run); an INT8 graph the export stage did not write is left out. For each, on validation and on
test: accuracy and macro-F1 with seeded bootstrap 95% intervals; on test, the paired bootstrap
interval of its accuracy difference from the best teacher runtime (and McNemar's exact test),
time, size, parameters, tokens and analytic GFLOPs per example.

How time is measured (`components/models/runtimes.py` holds the runners,
`components/text/encoding.py` the
encoder):
- threads are pinned for every pool: PyTorch and ONNX Runtime intra-op `evaluate.num_threads`,
  inter-op 1, ONNX Runtime's spinning off (its threads would otherwise keep the cores busy
  after each run), and the `tokenizers` pool sized to `evaluate.num_threads` before the first
  text is encoded; every encoder is built once, nothing is rebuilt inside a timed call;
- *tokenisation* (text to padded ids: the pre-cut, tokenizer, padding) is timed per encoder, in
  its own loop, never right after a model call, so systems sharing an encoder report the same
  figure; *model time* (padded tensors in, logits out) per system, batch after batch; *end to
  end* per system as it runs: each batch tokenised, then run, which is what a caller gets. It
  costs more than the sum of the two (`interplay_ms_per_example`): each evicts the other's
  working set from the caches (tokenising right after a 16 MB memory sweep costs what it costs
  right after a model call, about 1.4x its cost alone, on this project's 2-core Xeon);
- throughput: full passes over the test split in batches of `evaluate.throughput_batch_size`;
  latency: `evaluate.latency_examples` calls of `evaluate.latency_batch_size` (p50/p95 of the
  per-call sums);
- `evaluate.warmup` untimed calls first, then `evaluate.repeats` rounds; within a round every
  encoder, then every system, so machine noise hits all of them alike; medians over rounds
  are reported with their interquartile range (IQR);
- the deployed path is timed as it runs: the cascade student alone and the cascade (student on
  every text, the teacher on the deferred ones) through the bundle's own `Predictor` on the
  exported graphs, text in, label out, batched as `still predict` batches.

Decisions, on the validation split only (timings do not depend on the split): the *best
teacher runtime* is the fastest teacher system (end to end) whose validation accuracy lies
within the 95% interval of the most accurate teacher system's; the headline student is chosen
the same way among students; the cascade threshold is the fewest deferrals reaching the target
on validation. Test reports each choice once. Every headline ratio is against the best teacher
runtime, with PyTorch eager as a second column.

Produces two folders, because timings differ from machine to machine and run to run while
everything else is a function of the inputs:
- `paths.evaluate` (a DVC output, what a downstream stage may depend on): `quality.json`, every
  system's accuracy, macro-F1 and intervals on validation and test, size, parameters, tokens
  and GFLOPs per example, and the cascade policy (student, teacher, threshold chosen on
  validation, its test accuracy); `params.json`. Byte-identical on any machine that computes
  the same predictions.
- `paths.results` (git-tracked, declared as DVC metrics/plots but not as an output, so it is
  not in dvc.lock): `metrics.json` (all of the above plus the measured times, the best teacher
  runtime and headline student, ratios, cascade costs and measured speed, Pareto fronts,
  per-class F1), `plots/*.json`, `report.md` + `report.html`, PNGs, `environment.json`,
  `params.json`.
Both are logged to W&B after they are written; a W&B failure is a warning, not a lost run.

Run: `python -m components.evaluate` (or `dvc repro evaluate`).
"""

from __future__ import annotations

from pathlib import Path

from components.config import Params
from components.data.artifacts import QUALITY_FILE, load_label_names, load_split
from components.data.files import atomic_dir, write_json
from components.evaluation.cascade_choice import add_cascade, cost_cascade, run_cascade
from components.evaluation.selection import (
    best_of,
    compare_to_reference,
    deployed_summary,
    quality,
    summarize,
    system_points,
)
from components.evaluation.stats import Bootstrap
from components.evaluation.systems import (
    build_systems,
    deployed_deferrals,
    deployed_paths,
    deployed_predictor,
    predict_split,
)
from components.evaluation.timing import environment, measure_time
from components.models.runtimes import pin_torch_threads
from components.reporting import tracking
from components.reporting.console import print_cascade, print_headline, print_systems
from components.reporting.results import write_results
from components.reporting.tracking import log_to_wandb
from components.stage import stage_main
from components.text.encoding import pin_tokenizer_threads


def run(params: Params) -> dict:
    """Measure every system; write the machine-independent results (`paths.evaluate`, a DVC
    output) and the measured ones (`paths.results`, git-tracked, outside dvc.lock)."""
    cfg, bs = params.evaluate, params.evaluate.throughput_batch_size
    pin_tokenizer_threads(cfg.num_threads)  # before the first text is encoded
    pin_torch_threads(cfg.num_threads)
    test, val = load_split(params.paths, "test"), load_split(params.paths, "validation")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    v_texts, v_labels = val["text"].tolist(), val["label"].to_numpy()
    names = load_label_names(params.paths)
    systems, trt_skip = build_systems(params)
    if trt_skip:
        print(f"evaluate: TensorRT engines not evaluated: {trt_skip}")
    logits, val_logits = predict_split(systems, texts, bs), predict_split(systems, v_texts, bs)
    boot = Bootstrap(labels, len(names), cfg.bootstrap, params.seed)
    val_boot = Bootstrap(v_labels, len(names), cfg.bootstrap, params.seed)
    qual = {s.name: quality(s, logits[s.name], val_logits[s.name], texts, labels, v_labels,
                            boot, val_boot) for s in systems}
    uncertainty = {"method": "percentile bootstrap, paired across systems",
                   "resamples": cfg.bootstrap, "level": 0.95, "seed": params.seed}
    casc = run_cascade(params, logits, labels, val_logits, v_labels, boot)
    counts = {"test_examples": len(texts), "validation_examples": len(v_texts)}
    # Timing-free, so identical on every machine: what downstream stages may depend on.
    record = {**counts, "systems": qual, "uncertainty": uncertainty,
              "cascade": ({k: v for k, v in casc.items() if k != "validation_points"}
                          if casc else None)}

    # The deployed path needs the threshold chosen above; it is timed with the systems, round
    # by round, so the two figures for the same graph meet the same machine.
    predictor, deployed_note = deployed_predictor(params, casc, names)
    timings, deployed = measure_time(systems, texts, params,
                                     deployed_paths(predictor, bs) if predictor else None)
    if "cascade" in deployed:  # what the deployed cascade did on test, beside its time
        deployed["cascade"]["deferred_fraction"] = deployed_deferrals(predictor, texts, bs)
    results = {name: {**qual[name], **timings[name]} for name in qual}
    reference, headline = best_of(results, "teacher"), best_of(results, "student")
    compare_to_reference(results, logits, reference, boot)
    print_systems(results)
    metrics = summarize(results, reference, headline, counts, trt_skip, uncertainty,
                        deployed_summary(params, deployed, deployed_note, results))
    extra = []
    if casc:
        casc = cost_cascade(casc, results, reference, bs, deployed)
        extra = add_cascade(metrics, casc)
        print_cascade(casc, reference)
    print_headline(metrics)

    with atomic_dir(params.paths.evaluate, params, "evaluate") as out:
        write_json(out / QUALITY_FILE, record)
    points = system_points(results)
    images = write_results(params, metrics, points, extra, casc, labels,
                           logits[headline].argmax(-1), names, environment(params))
    with tracking.best_effort("evaluate", f"the results are in {params.paths.results} (`dvc "
                                          "repro -f evaluate` logs them again)"):
        log_to_wandb(params, metrics, points, casc, Path(params.paths.results), images)
    return metrics


def main() -> None:
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
