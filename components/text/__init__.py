"""How text reaches a model: the tokenizer configured once and the pre-cut (`encoding`, torch-free,
shared with the bundle), many texts to token ids (`batches`, torch-free) and padded tensors,
datasets and the Lightning data module (`tensors`)."""
