"""How a pruned model ships: ONNX export and its verification in ONNX Runtime (onnx_export.py), the graphs
traced (graphs.py), and the torch-free runner an edge device carries (runtime.py)."""
