"""The student search (`still search`, flows/search.py): the space of params.yaml's
`search.space` as trial overrides (`space`), the choice on validation (`choice`), and the
finalists timed side by side with the best teacher runtime (`timing`)."""

TRIAL_FILE = "trial.json"  # what a trial left: its overrides and the distill metrics
STUDENT_DIR = "student"  # the trial's student folder, kept for the finalists' timing
