"""Report-generation models: the bundle format (manifest, ONNX graphs, tokenizer, model
card), the ONNX Runtime generator used at run time, the reference torch model with its
training, export and evaluation. Only ``train``/``export``/``torch_model`` import torch; the
runtime needs numpy, onnxruntime and tokenizers only.
"""
