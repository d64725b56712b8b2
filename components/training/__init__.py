"""The one Lightning fit loop (`fit`, for the teacher and every student) and the teacher run over
many texts through Lightning's predict loop, split across processes (`teacher_outputs`)."""
