"""The GGUF tensor types prunekit writes (docs/gguf.md), in a module light enough for the CLI's parser."""

#: tensor type -> the block width every quantized row must be a multiple of
GGUF_BLOCKS = {"f32": 1, "f16": 1, "q8_0": 32, "q4_0": 32}
