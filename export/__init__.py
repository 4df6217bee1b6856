"""How a pruned model ships (ONNX export, ONNX Runtime check, int8, latency); filled by the export issue."""
