"""Model definitions shared by the stages that train, export and evaluate them (the student, its
token merging, the teacher adapter). Not stages: no stage imports another stage, they meet here
and in `components.data.artifacts`."""
