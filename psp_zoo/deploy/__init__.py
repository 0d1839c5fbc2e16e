"""Deploying a PSPNet without PyTorch, in modules that do not import each other needlessly:

- ``export.py``: the writers (ONNX, TorchScript, safetensors) and the table of formats;
- ``pooling.py``: adaptive average pooling whose bins follow the runtime input size (for ONNX);
- ``verify.py``: an exported file's logits against PyTorch's (``compare_outputs``);
- ``runtime.py``: ``OnnxModel``, an exported ONNX file run by onnxruntime as a model;
- ``onnx_head.py``: the factorized PSP head in the form the ONNX export traces (the default graph).

Running an exported model (``runtime``) never imports the exporter. This file imports nothing,
so importing one of them does not import the others.
"""
