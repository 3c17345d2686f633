"""Graph front ends (torch.fx, ONNX) that find linear regions and rewrite them."""
