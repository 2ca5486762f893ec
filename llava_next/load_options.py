"""What `load` defaults to and which quantization settings it takes, in a module without torch: the command line
shows and checks them (--help, a mistyped flag) without importing it, which takes ~2 s. `load`'s signature and
quantize.py take them from here, so each has one value."""

DEFAULT_MODEL = "demo"  # the bundled demo model (llava_next/demo)
DEFAULT_DTYPE = "auto"  # pipeline.resolve_dtype: the checkpoint's 16-bit dtype on a GPU; on a CPU by its instructions
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # pipeline.DTYPES maps them to torch's
QUANTIZE_MODES = ("int8", "int4", "w8a8")
GROUP_SIZES = (32, 64, 128, 256)  # inputs per int4 scale
DEFAULT_GROUP_SIZE = 128
