"""The models the stages train, export and evaluate: the student (`student`) and its token merging
(`merging`), the teacher adapter (`teacher`) and hub references (`hub`), the distillation losses
(`losses`) and the runners that time and check them (`runtimes`)."""
