"""Task heads over the backbone contract: the classification head (class token, average, attention probe), the
SegFormer all-MLP decoder and the UNETR decoder, with the key maps that load their checkpoints."""
