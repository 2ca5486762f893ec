"""Runtime forms of the model's linear layers, swapped in after loading: the model code never knows about them.

As gpt-fast's `convert_for_runtime`: `convert_linears(model, mode)` replaces nn.Linear modules by
  fast      float weights through oneDNN (`torch.ops.mkldnn._linear_pointwise`) on the CPU. In float32, PyTorch's
            nn.Linear goes through MKL there, which reads the weights of a one-token decoding step at about half
            the memory bandwidth on an AMD EPYC; oneDNN reaches it (and is ~1.2x faster on prompt-sized matmuls).
            On other processors MKL's is the faster (an Intel Xeon with AMX): the engine times both
            (time_float32_kernels). Same weights, same results up to float rounding. In bfloat16 nn.Linear is
            already oneDNN's, but on a plain weight it reads a decoding step's weights at ~11 GB/s; the weight
            reordered once into oneDNN's blocked layout reads at ~21 GB/s, with the same results bit for bit (a
            prompt's matmuls take as long), on an AMD EPYC.
            On an Intel Xeon with AMX oneDNN read the blocked weight at about half the bandwidth and torch.mv the
            plain one at 80-100% of it, so a CPU engine times both for its decoding layers and keeps the faster
            (time_bf16_layouts).
  int8      weight-only int8, one symmetric scale per output channel. A decoding step (few rows) runs
            `torch._weight_int8pack_mm` on the int8 weights on the CPU; on CUDA a compiled step of up to
            CUDA_SUMMED_ROWS rows a float32 sum over the int8 weight rows (summed_int8_matmul, one kernel), and
            anything else a matmul on the weights converted to 16 bits (a copy); a prompt (many rows,
            where those are slow) runs a float matmul on the weights dequantized one layer at a time. Compiled
            CPU steps may hold the weights in column blocks instead (`block_int8_columns`): inductor's loop over
            them reads a one-row step's weights ~1.7x faster than PyTorch's kernel on some processors (an AMD
            EPYC) and slower on others (an Intel Xeon with AMX), so a compiled engine times both
            (`time_int8_layouts`) and keeps the faster.
  int4      weight-only int4, asymmetric, one scale and zero point per `group_size` inputs, through the int4
            kernels (`_weight_int4pack_mm_for_cpu` on the CPU, tinygemm's `_weight_int4pack_mm` on CUDA).
  w8a8      int8 weights (per output channel) and int8 activations (per token, computed on the fly), multiplied
            with `torch._int_mm`: the prompt's matmuls in integer arithmetic, several times float32 on CPUs with VNNI.
            On the CPU a decoding step of one row too, eager or compiled, where that is the faster form: one row
            through _int_mm read the weights 1.2-1.7x as fast as int8's weight-only kernel on two AMD EPYCs (and
            faster than int8's column blocks, so w8a8's weights are never blocked), 0.8x at 7B widths on an Intel
            Xeon with AMX (bench_kernels.py, BENCHMARKS.md): the engine times both (time_w8a8_one_row). Steps of
            2..DECODE_ROWS rows run int8's weight-only kernel, which _int_mm is ~2x slower than there (an AMD EPYC,
            torch 2.13), and so does a single row wherever others may run beside it (a scheduler of several slots:
            a server, a batch), so that a sequence's numbers are the same alone or beside up to DECODE_ROWS - 1
            others. On CUDA, whose _int_mm needs more than 16 rows, steps of fewer run int8's weight-only forms.

What is converted, decided from measurements (BENCHMARKS.md): every decoder projection and the lm_head (which a
decoding step reads entirely, ~20% of the bytes of a mid-size model); in w8a8 also the vision tower's and the
projector's linears (the prompt's other matmuls). Under int8 and int4 those stay in float, and on the CPU in
bfloat16 they take oneDNN's blocked layout (`fast/packed`), as the bfloat16 mode's do: through nn.Linear on their
plain weights the vision tower's matmuls took 1.2-1.45x as long. The embedding table stays float (a lookup reads
one row), and so do norms. A layer whose shape a kernel cannot take (int4 needs in_features divisible by the group
size and out_features by 16) is converted to int8 instead, and `describe()` says so.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LlavaError
from .load_options import DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_MODES
from .memory import release_free_memory

# up to this many rows, weight-only kernels (w8a8's one row excepted, where _int_mm is faster: W8A8Linear); above,
# dequantize and run a float matmul (w8a8: _int_mm)
DECODE_ROWS = 8
# On the CPU the weight-only kernels stay faster than dequantizing a prompt's weights up to more rows than a decoding
# step has: follow-up turns use them. From `benchmarks/bench_kernels.py --preset mistral-7b --layers 0 --prompt-rows
# ...` (BENCHMARKS.md): on the 7B gate/up matrix, dequantizing costs ~150 ms (int8) / ~250 ms (int4) whatever the
# rows; the int8 kernel takes ~2-3 ms a row, the int4 kernel ~1.4 ms a row on an AMD EPYC and ~3.2 ms on an Intel Xeon
# (where bfloat16 matmuls, on AMX, take ~0.5 ms a row after dequantizing).
INT8_KERNEL_ROWS = 64
# PyTorch's CPU int8 kernel takes the inputs 16 at a time: at other widths (8, 24, 40) it returns wrong numbers, at
# some (20) it crashes (torch 2.13). Layers of other widths dequantize instead.
INT8_KERNEL_INPUTS = 16
INT4_KERNEL_ROWS = 128
# Compiled CPU decoding steps hold int8 weights in column blocks (Int8Linear.block_columns), BLOCK_COLUMNS outputs
# side by side, and multiply up to BLOCKED_ROWS rows through them: each row is its own pass over the weights, which
# up to 16 rows still beats dequantizing the blocks (`benchmarks/bench_kernels.py --step-rows`, BENCHMARKS.md).
BLOCK_COLUMNS = 16
BLOCKED_ROWS = 16
# Compiled CUDA decoding steps of up to this many rows multiply int8 weights as a sum over the inputs
# (summed_int8_matmul), which inductor fuses into one kernel reading each weight byte once per row. F.linear on the
# weights made 16-bit instead reads them once for any number of rows, but compiled it first writes and reads a
# 16-bit copy of every weight, 5 bytes a weight in all: the sum moves fewer bytes up to ~4 rows.
CUDA_SUMMED_ROWS = 4
QUANTIZE_SLICE_BYTES = 4 * 2**20
PROMPT_SLICE_BYTES = 16 * 2**20


class QuantizeError(LlavaError, ValueError):
    """Quantization settings that cannot work."""


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()  # the int kernels want contiguous rows


class FastLinear(nn.Module):
    """A float linear through oneDNN on the CPU (nn.Linear's own path elsewhere). `packed`: the weight is held in
    oneDNN's blocked layout (an mkldnn tensor), reordered once here; the dense one is freed. A plain bfloat16 weight
    multiplies one row with torch.mv instead (onednn_linear), which on some processors reads it faster than oneDNN
    reads either layout: the engine times the two layouts for a model's decoding layers (time_bf16_layouts). A
    float32 layer runs F.linear instead where the engine measured that faster (`onednn`, time_float32_kernels)."""

    def __init__(self, linear: nn.Linear, packed: bool = False):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # float32 rows through oneDNN's matmul, or (False) PyTorch's own F.linear: which is faster depends on the
        # processor, so the engine times both (time_float32_kernels); bfloat16 layers always take oneDNN's
        self.onednn = True
        if packed:
            self.pack()

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def pack(self) -> None:
        # The layout is chosen for one row (a decoding step); prompts run on it about as fast as on the plain weight.
        if not self.packed:
            self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1),
                                       requires_grad=False)

    def unpack(self) -> None:
        if self.packed:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or not self.onednn:
            weight = self.weight.to_dense() if self.weight.is_mkldnn else self.weight
            return F.linear(x, weight, self.bias)
        # the operator where torch.compile traces (it must stay opaque, below); eagerly the function it runs, without
        # the dispatcher's ~7 us a call (49 calls a decoding step of the medium benchmark model)
        linear = torch.ops.llava_next.onednn_linear if torch.compiler.is_compiling() else onednn_linear
        out = linear(_rows(x), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if rows.shape[0] == 1 and weight.dtype == torch.bfloat16 and not weight.is_mkldnn:
        # PyTorch's bfloat16 matrix-vector kernel (float32 sums, rounded once, as oneDNN's): on an Intel Xeon with
        # AMX it read a 7B matrix at 19 GB/s where oneDNN read the reordered one at 7.6 and the plain one at 12.8
        if bias is None:
            return torch.mv(weight, rows[0]).unsqueeze(0)
        return torch.addmv(bias, weight, rows[0]).unsqueeze(0)
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def _onednn_linear_shape(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], weight.shape[0]))


# FastLinear's matmul as an operator that torch.compile keeps opaque. Inductor lowers oneDNN's linear itself only for
# a weight that is a constant of the graph, which a weight in the blocked layout never becomes: traced as is, the
# compile failed (and decoding fell back to eager); keeping nn.Linear for compiled models instead made bfloat16
# decoding on a plain weight ~1.5-1.9x slower than eager FastLinear (measured at 7B widths). Eager FastLinear calls
# the function itself (the same code, without the dispatch).
_library = torch.library.Library("llava_next", "FRAGMENT")
_library.define("onednn_linear(Tensor rows, Tensor weight, Tensor? bias) -> Tensor")
_library.impl("onednn_linear", onednn_linear, "CompositeExplicitAutograd")
_library.impl("onednn_linear", _onednn_linear_shape, "Meta")


def float_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.float32, copy=True)  # a new tensor even from float32 rows: an operator's output never aliases


# The rows of a blocked int8 matmul, made float32 by an operator inductor cannot see into: otherwise it fuses the
# operations producing the rows (the RMS norm before a projection) into the matmul's loop, recomputed for every
# block of outputs, which made compiled decoding slower than eager (34 against 51 tokens/s on the medium preset).
_library.define("float_rows(Tensor rows) -> Tensor")
_library.impl("float_rows", float_rows, "CompositeExplicitAutograd")
_library.impl("float_rows", lambda rows: rows.new_empty(rows.shape, dtype=torch.float32), "Meta")


def blocked_int8_matmul(rows: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows (M, in) times int8 weights in column blocks, (out / C, in, C), scaled per output -> (M, out), summed in
    float32. Written for inductor, which compiles it into one loop that reads each weight once per row. On a CPU, with
    C = BLOCK_COLUMNS, the loop multiplies that many outputs at a time in vector registers: ~1.7x PyTorch's int8 kernel
    for one row (which takes the weights row by row) on an AMD EPYC, 0.55-0.7x at 7B widths on an Intel Xeon with AMX
    (time_int8_layouts). On CUDA the plain weights are blocks of one output, (out, in, 1): one reduction along each
    contiguous weight row (CUDA_SUMMED_ROWS).
    Eagerly it would build an (M, out, in) temporary: compiled steps only."""
    x = torch.ops.llava_next.float_rows(rows)
    acc = (x[:, None, :, None] * blocks.float()[None]).sum(2)  # (M, out / C, C) float32
    return (acc.view(rows.shape[0], -1) * scales.float()).to(rows.dtype)


def summed_int8_matmul(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows (M, in) times plain int8 weights (out, in), scaled per output -> (M, out): blocked_int8_matmul on blocks
    of one output, the form of compiled CUDA steps (CUDA_SUMMED_ROWS). Compiled steps only."""
    return blocked_int8_matmul(rows, weight.unsqueeze(-1), scales)


def copied_int8_matmul(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows (M, in) times plain int8 weights (out, in) converted to the rows' dtype, scaled per output -> (M, out):
    CUDA's form beyond CUDA_SUMMED_ROWS rows and eagerly. The conversion is a 16-bit copy of the weights each call,
    eagerly or compiled (inductor gives a matmul its inputs whole)."""
    return F.linear(rows, weight.to(rows.dtype)) * scales.to(rows.dtype)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether FastLinear can hold `weight` reordered: bfloat16 on a CPU whose oneDNN runs bfloat16 natively."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def rows_per_slice(budget_bytes: int, row_bytes: int, multiple: int = 1) -> int:
    """How many rows of `row_bytes` each fit in `budget_bytes` (at least one), a multiple of `multiple`: the slice
    size of the work below done a slice of a matrix at a time, so that its temporaries stay small."""
    rows = budget_bytes // max(1, row_bytes)
    return max(multiple, rows // multiple * multiple)


def _row_slices(weight: torch.Tensor):
    """Row ranges of `weight` holding ~QUANTIZE_SLICE_BYTES as float32: quantizing a slice at a time bounds the
    float32 temporaries (a 7B's fused gate/up projection is 470 MB in float32, and the arithmetic makes several)."""
    rows = rows_per_slice(QUANTIZE_SLICE_BYTES, 4 * weight.shape[1])
    return [slice(i, i + rows) for i in range(0, weight.shape[0], rows)]


def matmul_by_output_slices(rows: torch.Tensor, out_features: int, step: int, weight_slice) -> torch.Tensor:
    """rows (M, in) times a quantized weight, dequantized `step` output features at a time: `weight_slice(first,
    last)` gives those features' weight, (in, last - first). Dequantizing a whole 7B matrix at once takes longer
    than its matmul (a pass over memory per operation, fresh pages for each temporary); slices of a few MB stay in
    the cache. The same numbers as one matmul on the whole dequantized weight, up to float summation order."""
    out = None
    for first in range(0, out_features, step):
        last = min(first + step, out_features)
        product = torch.matmul(rows, weight_slice(first, last))
        if last - first == out_features:
            return product  # one slice: no copy
        if out is None:
            out = product.new_empty((rows.shape[0], out_features))
        out[:, first:last] = product
    return out


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values and one float32 scale per output channel (symmetric, max |w| -> 127)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for rows in _row_slices(weight):
        w = weight[rows].float()
        low, high = w.aminmax(dim=1)
        scales[rows] = torch.maximum(-low, high).clamp(min=1e-8) / 127  # max |w| without a |w| copy
        q[rows] = (w / scales[rows, None]).round_().clamp_(-127, 127)  # one temporary, cast as it is copied
    return q, scales


def int4_weights(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int4 values 0..15 (uint8) and scales_and_zeros (in / group_size, out, 2), float32, in the
    convention of PyTorch's int4 kernels: w = (q - 8) * scale + zero, per group of `group_size` inputs."""
    out_features, in_features = weight.shape
    q = torch.empty((out_features, in_features), dtype=torch.uint8, device=weight.device)
    scales_and_zeros = torch.empty((in_features // group_size, out_features, 2), dtype=torch.float32,
                                   device=weight.device)
    for rows in _row_slices(weight):
        w = weight[rows].float().reshape(-1, in_features // group_size, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scales = (high - low).clamp(min=1e-8) / 15
        zeros = low + scales * 8
        q[rows] = (w - low).div_(scales).round_().clamp_(0, 15).view(-1, in_features)
        scales_and_zeros[:, rows] = torch.cat([scales, zeros], dim=-1).transpose(0, 1)  # (groups, rows, 2)
    return q, scales_and_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in / 2) uint8, the even input in the low nibble."""
    return (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles, as uint8 values 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Nibble-packed int4 values and their scales -> the (out, in) weight in `dtype`."""
    return dequantize_int4_transposed(unpack_nibbles(packed).t(), scales_and_zeros, group_size, dtype).t()


def dequantize_int4_transposed(q_t: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                               dtype: torch.dtype) -> torch.Tensor:
    """int4 values 0..15 transposed, (in, out) uint8, and their scales -> the weight transposed, (in, out) in `dtype`
    (laid out for x @ w, in q_t's memory order): w = (q - 8) * scale + zero, per group of `group_size` inputs, in
    float32 for 16-bit dtypes and rounded once."""
    if q_t.dtype != torch.uint8:  # (read as int8 below: wider integers would be reinterpreted, not converted)
        raise QuantizeError(f"int4 values come as uint8, not {q_t.dtype}")
    in_features, out_features = q_t.shape
    # (groups, 1, out), contiguous: broadcast from the strided views (every other element of scales_and_zeros) the
    # multiply and the add took ~6x as long (25 against 4 ms on a 16 MB slice of a 7B matrix, measured when they were
    # two operations)
    scales = scales_and_zeros[..., 0].to(dtype).contiguous().unsqueeze(1)
    zeros = scales_and_zeros[..., 1].to(dtype).contiguous().unsqueeze(1)
    # q - 8 on the one-byte values (0..15 read as int8), then one multiply-add: two passes over the 16-bit weights
    # instead of four (convert, subtract, multiply, add, each rounded): 41 against 60 ms for the 7B gate/up matrix,
    # a 256-row prompt through it 110 against 130 ms (BENCHMARKS.md)
    centred = (q_t.view(in_features // group_size, group_size, out_features).view(torch.int8) - 8).to(dtype)
    # written in centred's memory order (a transposed q_t gives the (out, in) weight contiguous): addcmul would take
    # its output's order from `zeros`, which a transposed q_t's cannot be viewed back from without a copy
    # (detached: quantized weights are never trained, and an out= argument refuses inputs that need gradients)
    w = torch.addcmul(zeros.detach(), centred, scales.detach(), out=torch.empty_like(centred))
    return w.view(in_features, out_features)


# PyTorch's CPU int4 kernel takes its weights in a layout of its own (`torch._convert_weight_to_int4pack_for_cpu`),
# which it documents nowhere and has no inverse for. Read here so that an int4 layer keeps one copy of its weights
# (the kernel's) instead of two; `cpu_int4_layout_is_known` checks the reading against the packer of the PyTorch
# at hand before anything relies on it, and an int4 layer keeps its own copy where it fails.
CPU_INT4_BLOCK = 64  # rows per block: byte j of input k holds rows j (low nibble) and j + 32 (high)


def unpack_cpu_int4_transposed(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The CPU int4 kernel's layout -> int4 values 0..15, transposed: (in, out) uint8, the order it stores them in
    (so no slow byte transpose). Whole 64-row blocks are stored input by input, 32 bytes each (rows j and j + 32);
    the rows after the last whole block input by input in row pairs."""
    flat = packed.reshape(-1)
    whole = out_features // CPU_INT4_BLOCK * CPU_INT4_BLOCK
    parts = []
    if whole:
        blocks = flat[: whole * in_features // 2].view(whole // CPU_INT4_BLOCK, in_features, CPU_INT4_BLOCK // 2)
        parts.append(torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(0, 1).reshape(in_features, whole))
    if out_features > whole:
        tail = flat[whole * in_features // 2:].view(in_features, (out_features - whole) // 2)
        parts.append(torch.stack([tail & 15, tail >> 4], dim=2).reshape(in_features, -1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


_cpu_int4_layout_known: bool | None = None


def cpu_int4_layout_is_known() -> bool:
    """Whether unpack_cpu_int4_transposed reads what this PyTorch's packer writes (checked once, on a matrix with a
    tail)."""
    global _cpu_int4_layout_known
    if _cpu_int4_layout_known is None:
        values = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (CPU_INT4_BLOCK * 2 + 16, 64), dtype=torch.int32, generator=values)
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            _cpu_int4_layout_known = packed.dtype == torch.uint8 and torch.equal(
                unpack_cpu_int4_transposed(packed, *q.shape).t().to(torch.int32), q)
        except RuntimeError:
            _cpu_int4_layout_known = False
    return _cpu_int4_layout_known


class Int8Linear(nn.Module):
    """Weight-only int8: y = x @ (q * scale)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = int8_weights(linear.weight.detach())
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, "meta")
        module.weight, module.scales = q, scales.to(linear.weight.dtype)  # (no second copy of the matrix)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    @property
    def blocked(self) -> bool:
        return self.weight.dim() == 3

    def can_block(self) -> bool:
        return self.weight.device.type == "cpu" and self.out_features % BLOCK_COLUMNS == 0

    def block_columns(self) -> None:
        """Lays the weight out in column blocks (see blocked_int8_matmul): (out, in) -> (out / BLOCK_COLUMNS, in,
        BLOCK_COLUMNS), the only copy. Compiled steps multiply it as it is; eager calls take a slice of rows back
        out at a time."""
        if not self.blocked:
            self.weight = self.weight.view(-1, BLOCK_COLUMNS, self.in_features).transpose(1, 2).contiguous()

    def unblock_columns(self) -> None:
        if self.blocked:
            self.weight = self.values().contiguous()

    def values_t(self, first: int, last: int) -> torch.Tensor:
        """The int8 weights of output features first .. last, transposed: (in, last - first). From column blocks a
        copy of the blocks holding them, reordered in runs of BLOCK_COLUMNS bytes (taken out element by element
        instead, the copy ran at ~2 GB/s); from the plain layout a view."""
        if not self.blocked:
            return self.weight[first:last].t()
        blocks = self.weight[first // BLOCK_COLUMNS : -(-last // BLOCK_COLUMNS)]
        skip = first % BLOCK_COLUMNS
        return blocks.permute(1, 0, 2).reshape(self.in_features, -1)[:, skip : skip + last - first]

    def values(self, rows: slice = slice(None)) -> torch.Tensor:
        """The int8 weights of these output rows, (rows, in); a view, not contiguous from column blocks."""
        first, last, _ = rows.indices(self.out_features)
        return self.values_t(first, last).t()

    def dequantized(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        return self.values(rows).to(dtype) * self.scales[rows, None].to(dtype)

    def dequantized_t(self, dtype: torch.dtype, first: int, last: int) -> torch.Tensor:
        """Output features first .. last dequantized, (in, last - first): what a prompt's matmul takes."""
        return self.values_t(first, last).to(dtype) * self.scales[first:last].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        cpu = x.device.type == "cpu"
        if self.blocked and rows.shape[0] <= BLOCKED_ROWS and torch.compiler.is_compiling():
            out = blocked_int8_matmul(rows, self.weight, self.scales)
        elif cpu and (rows.shape[0] > INT8_KERNEL_ROWS or self.blocked or self.in_features % INT8_KERNEL_INPUTS):
            # A prompt; or column blocks eagerly (a prompt's last position, a short follow-up: PyTorch's kernel
            # wants the plain layout) or with more rows than they are fast for; or a width PyTorch's kernel gets
            # wrong: dequantized, a slice at a time
            step = rows_per_slice(PROMPT_SLICE_BYTES, self.in_features * x.element_size(), BLOCK_COLUMNS)
            out = matmul_by_output_slices(rows, self.out_features, step,
                                          lambda first, last: self.dequantized_t(x.dtype, first, last))
        elif not cpu and rows.shape[0] > DECODE_ROWS:
            out = F.linear(rows, self.dequantized(x.dtype))
        elif x.device.type == "cuda" and rows.shape[0] <= CUDA_SUMMED_ROWS and torch.compiler.is_compiling():
            out = summed_int8_matmul(rows, self.weight, self.scales)
        elif x.device.type == "cuda":
            # PyTorch's CUDA int8pack kernel is a naive one (a thread per output, uncoalesced): the weights made
            # 16-bit instead
            out = copied_int8_matmul(rows, self.weight, self.scales)
        else:
            out = torch._weight_int8pack_mm(rows, self.weight, self.scales.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Weight-only int4, groupwise. `weight` holds the values nibble-packed (out, in / 2) with `scales_and_zeros`
    (what a checkpoint stores); `pack()` lays them out for the device's decoding kernel after loading (the layout
    differs between CPU and CUDA, so it is never saved). On the CPU the kernel's copy is then the only one
    (`weight` becomes None): a prompt's matmul and saving read the values back from it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty((out_features, in_features // 2), dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty((in_features // group_size, out_features, 2),
                                                             dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        q, scales_and_zeros = int4_weights(linear.weight.detach(), group_size)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                     group_size, "meta")
        module.weight, module.scales_and_zeros = pack_nibbles(q), scales_and_zeros.to(linear.weight.dtype)
        del q
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        module.pack()
        return module

    def pack(self) -> None:
        if self.weight.device.type == "cuda":  # tinygemm: (out, in / 2) uint8, the even input in the high nibble
            q = unpack_nibbles(self.weight).to(torch.int32)
            self.packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
            return
        # The CPU kernel's layout takes int32 values (8x the nibbles): converted a slice of rows at a time, whole
        # 64-row blocks of its layout, which pack alike one by one or all together.
        self.packed = torch.empty((self.out_features, self.in_features // 2), dtype=torch.uint8)
        step = rows_per_slice(QUANTIZE_SLICE_BYTES, 4 * self.in_features, CPU_INT4_BLOCK)
        for first in range(0, self.out_features, step):
            rows = slice(first, first + step)
            q = unpack_nibbles(self.weight[rows]).to(torch.int32)
            self.packed[rows] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        if cpu_int4_layout_is_known():
            self.weight = None

    def values(self) -> torch.Tensor:
        """The int4 values 0..15, (out, in) uint8."""
        if self.weight is not None:
            return unpack_nibbles(self.weight)
        return unpack_cpu_int4_transposed(self.packed, self.out_features, self.in_features).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows.shape[0] > (INT4_KERNEL_ROWS if x.device.type == "cpu" else DECODE_ROWS):
            if self.weight is None:  # on the CPU, from the kernel's layout, which holds the weight transposed
                def weight_slice(first: int, last: int) -> torch.Tensor:
                    # whole 64-row blocks (and the tail rows, in the last slice) lie in the layout one after another
                    packed = self.packed.view(-1)[first * self.in_features // 2 : last * self.in_features // 2]
                    q_t = unpack_cpu_int4_transposed(packed, last - first, self.in_features)
                    return dequantize_int4_transposed(q_t, self.scales_and_zeros[:, first:last], self.group_size,
                                                      x.dtype)

                step = rows_per_slice(PROMPT_SLICE_BYTES, self.in_features * x.element_size(), CPU_INT4_BLOCK)
                out = matmul_by_output_slices(rows, self.out_features, step, weight_slice)
            else:
                out = F.linear(rows, dequantize_int4(self.weight, self.scales_and_zeros, self.group_size, x.dtype))
        elif x.device.type == "cuda":
            out = torch._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros.to(x.dtype))
        else:
            out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                    self.scales_and_zeros.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


class W8A8Linear(Int8Linear):
    """int8 weights and per-token int8 activations: y = (xq @ q^T) * x_scale * w_scale, in int32 then float. On the
    CPU for a prompt, and for one row unless `one_row_int8` is off (engine.w8a8_one_row_form, and a scheduler of
    several slots); a decoding step of 2..DECODE_ROWS rows uses the weight-only kernel, as on CUDA a step of up to
    16 rows does (module docstring)."""

    one_row_int8 = True

    def can_block(self) -> bool:
        return False  # (_int_mm multiplies one row faster than the column blocks do: the module's docstring)

    def block_columns(self) -> None:
        raise QuantizeError("w8a8 weights stay in the plain layout, which torch._int_mm multiplies")

    def int8_rows_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in), each quantized to int8 by its own scale, times the int8 weights in integers (torch._int_mm),
        scaled back to the rows' dtype: (M, out), without the bias."""
        x_scales = rows.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-8) / 127
        xq = (rows / x_scales).round_().clamp_(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight.t())  # (rows, out) int32; the transposed view is the fast layout
        return acc.to(rows.dtype).mul_(x_scales.to(rows.dtype)).mul_(self.scales.to(rows.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        n = rows.shape[0]
        if x.device.type == "cuda" and n <= 16:  # CUDA's _int_mm needs > 16 rows
            return super().forward(x)
        if n <= DECODE_ROWS and (n > 1 or not self.one_row_int8):
            return super().forward(x)
        out = self.int8_rows_matmul(rows)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def runs_in_decoding(name: str) -> bool:
    """Whether a LlavaModel's module `name` is part of the decoder or the lm_head: what a decoding step runs."""
    return name.startswith("language_model.") or name == "lm_head"


def targets(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules a mode may convert: the decoder's, the lm_head, the vision tower's and the
    projector's (conversion_plan says what each becomes)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if runs_in_decoding(name) or name.startswith(("vision_tower.", "multi_modal_projector.")):
            names.append(name)
    return names


def shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (a tied lm_head and embedding)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {i for i, n in counts.items() if n > 1}


def float_prompt_layers(model: nn.Module) -> dict[str, str]:
    """{name: "fast/packed"} for the vision tower's and projector's nn.Linear layers that oneDNN's blocked layout can
    hold (bfloat16 on a CPU with native bfloat16). The weight-only modes keep these layers float, in that layout, as
    the bfloat16 mode has them: nn.Linear on their plain weights took 1.2-1.45x as long in a prompt's vision tower
    (BENCHMARKS.md). A saved int8 or int4 checkpoint's layers are laid out so after loading."""
    shared = shared_weights(model)
    weights = {name: model.get_submodule(name).weight for name in targets(model) if not runs_in_decoding(name)}
    return {name: "fast/packed" for name, weight in weights.items() if can_pack(weight) and id(weight) not in shared}


def decoding_bf16_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of the layers that decoding_bf16_layers will return once the "fast" conversion has made FastLinear
    of them, in the same order: known before their weights are loaded (engine.bf16_layout_before_loading)."""
    shapes = []
    for name, kind in conversion_plan(model, "fast").items():
        linear = model.get_submodule(name)
        if kind == "fast" and runs_in_decoding(name) and can_pack(linear.weight):  # (not the float32 ones)
            shapes.append((linear.out_features, linear.in_features))
    return shapes


def conversion_plan(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    decoding_packed: bool = False) -> dict[str, str]:
    """{module name: what `mode` makes of it} for the model's linear layers, without touching them. `decoding_packed`:
    "fast" lays out the bfloat16 decoding layers in oneDNN's blocked layout too (where the engine chose it for them
    before loading, engine.bf16_layout_before_loading), not plain."""
    if mode not in QUANTIZE_MODES + ("fast",):
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise QuantizeError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size!r}")
    plan = {}
    shared = shared_weights(model)
    # the prompt-only layers (vision tower, projector) stay float under every mode but w8a8: in oneDNN's blocked
    # layout where it can hold them (float_prompt_layers), the others as they are
    float_layers = float_prompt_layers(model) if mode != "w8a8" else {}
    for name in targets(model):
        linear = model.get_submodule(name)
        if mode == "fast" and linear.weight.dtype == torch.float32:
            plan[name] = "fast"
        elif mode != "w8a8" and not runs_in_decoding(name):
            if name in float_layers:
                plan[name] = float_layers[name]
        elif mode == "fast":
            # (16-bit layers that cannot be packed stay nn.Linear, which runs oneDNN where the CPU has the
            # instructions; a tied lm_head gets no second copy.) The others load plain, or blocked as they are read
            # where the engine's timing before loading found oneDNN's blocked layout faster (decoding_packed), so no
            # processor pays for both
            if can_pack(linear.weight) and id(linear.weight) not in shared:
                plan[name] = "fast/packed" if decoding_packed else "fast"
        elif mode == "int4" and linear.in_features % group_size == 0 and linear.out_features % 16 == 0:
            plan[name] = f"int4/g{group_size}"
        else:
            plan[name] = "w8a8" if mode == "w8a8" else "int8"
    return plan


def convert_linear(model: nn.Module, name: str, kind: str) -> None:
    """Replace the linear `name` by its `kind` form (a conversion_plan value). A tied lm_head gets its own
    quantized copy; the embedding stays float."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, attr)
    if kind.startswith("fast"):
        new = FastLinear(linear, packed=kind == "fast/packed")
    elif kind.startswith("int4/g"):
        new = Int4Linear.from_linear(linear, int(kind.removeprefix("int4/g")))
    else:
        new = (W8A8Linear if kind == "w8a8" else Int8Linear).from_linear(linear)
    setattr(parent, attr, new)


def convert_linears(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, str]:
    """Swap the model's linear layers for `mode`'s runtime form, in place, one at a time (each float weight is
    freed as soon as its replacement exists). Returns {module name: what it became}."""
    plan = conversion_plan(model, mode, group_size)
    for name, kind in plan.items():
        convert_linear(model, name, kind)
    return plan


class ConvertWhileLoading:
    """convert_linears done during loading: each linear is replaced as soon as load_weights has filled the last of
    its tensors (`loaded` is its on_loaded hook), and what it freed is handed back to the system, so the model never
    holds all of its float weights at once. Loading into memory that the model allocated but has not touched yet
    (pages are committed when written), the peak is then the converted model plus about one layer's float weights,
    instead of the float model plus the conversion's temporaries."""

    def __init__(self, model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                 decoding_packed: bool = False):
        self.model = model
        self.plan = conversion_plan(model, mode, group_size, decoding_packed)
        owner = {}  # a linear's weight and bias storage -> the linear's name
        for name in self.plan:
            linear = model.get_submodule(name)
            for tensor in (linear.weight, linear.bias):
                if tensor is not None:
                    owner[tensor.untyped_storage().data_ptr()] = name
        # the checkpoint names (q_proj, k_proj, ... of a fused projection) each linear waits for
        self.waiting: dict[str, set[str]] = {name: set() for name in self.plan}
        self.linear_of: dict[str, str] = {}
        for weight_name, tensor in model.checkpoint_weights().items():
            name = owner.get(tensor.untyped_storage().data_ptr())
            if name is not None:
                self.waiting[name].add(weight_name)
                self.linear_of[weight_name] = name

    def loaded(self, weight_name: str) -> None:
        name = self.linear_of.get(weight_name)
        if name is None:
            return
        self.waiting[name].discard(weight_name)
        if not self.waiting[name]:
            del self.waiting[name]
            convert_linear(self.model, name, self.plan[name])
            release_free_memory()

    def finish(self) -> dict[str, str]:
        """Converts what loading did not reach (nothing, after a load that succeeded); returns the plan."""
        for name in list(self.waiting):
            convert_linear(self.model, name, self.plan[name])
        self.waiting.clear()
        return self.plan


def empty_converted(model: nn.Module, converted: dict[str, str]) -> None:
    """Put empty modules of the recorded kinds in place (on the model's device, e.g. meta), to load a quantized
    checkpoint's tensors into."""
    for name, kind in converted.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise QuantizeError(f"the quantized checkpoint names {name}, which is not a linear layer of this model")
        args = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        if kind.startswith("int4/g"):
            new = Int4Linear(*args, group_size=int(kind.removeprefix("int4/g")), device=linear.weight.device)
        elif kind in ("int8", "w8a8"):
            new = (W8A8Linear if kind == "w8a8" else Int8Linear)(*args, device=linear.weight.device)
        else:
            raise QuantizeError(f"unknown quantized layer kind {kind!r} for {name}")
        setattr(parent, attr, new)


def decoding_int8_layers(model: nn.Module) -> list[Int8Linear]:
    """A LlavaModel's CPU int8 layers that decoding steps run and that can take column blocks (whole blocks of
    outputs; weight-only int8's, not w8a8's): the layers block_int8_columns lays out and time_int8_layouts times."""
    return [module for name, module in model.named_modules()
            if isinstance(module, Int8Linear) and runs_in_decoding(name) and module.can_block()]


def block_int8_columns(model: nn.Module, blocked: bool = True) -> int:
    """Lays the weights of a LlavaModel's CPU int8 layers that decoding steps run (the decoder's, the lm_head's;
    int8's, not w8a8's, decoding_int8_layers) out for compiled steps of few rows (blocked_int8_matmul), or back
    (`blocked=False`: steps of many rows, which PyTorch's kernel multiplies in one pass over the plain weights).
    Returns the number of layers changed."""
    return lay_out_int8_layers(decoding_int8_layers(model), blocked)


def lay_out_int8_layers(layers: list[Int8Linear], blocked: bool) -> int:
    """Puts each layer's weights in column blocks, or back, one at a time (the model's memory grows by one layer at
    most), each replaced weight handed back to the system: under the engine's allocator settings
    (memory.keep_freed_memory) the freed ones stayed with the process, 74 MiB of the medium preset's 303 MiB int8
    model. (The hand-back is process-wide: blocks kept for a prompt's activations go too, and the next prompt faults
    them in again; layouts change at load, when a server starts and once if a compile fails, not between prompts.)
    Returns the number of layers changed."""
    changed = 0
    for layer in layers:
        if layer.blocked != blocked:
            layer.block_columns() if blocked else layer.unblock_columns()
            release_free_memory()
            changed += 1
    return changed


def _blocked_matmuls(rows: list[torch.Tensor], blocks: list[torch.Tensor], scales: list[torch.Tensor]):
    return [blocked_int8_matmul(x, w, s) for x, w, s in zip(rows, blocks, scales)]


def fastest_passes(layouts, repeats: int) -> dict[str, float]:
    """{name: the fastest of `repeats` timed passes of run()} for each (name, lay_out, run) in turn: lay_out() puts
    the weights in that layout, an untimed pass warms it (a compile, first touches), then the timed ones. A name
    given twice keeps its faster round."""
    times = {}
    for name, lay_out, run in layouts:
        lay_out()
        with torch.inference_mode():
            run()
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times[name] = min(times.get(name, math.inf), time.perf_counter() - start)
    return times


_compiled_blocked_matmuls = None
LAYOUT_PROBE_GROUP = 4  # layers per compiled call: a decoder layer's int8 matmuls (fused q/k/v, o, gate/up, down)
# Enough weights to come from memory, not the caches (several times a server processor's L3), while laying them out
# twice stays short: all of a mid-size model's, 5 of a 7B's 32 layers (timing all 7 GB took 43 s, mostly layouts).
LAYOUT_PROBE_BYTES = 2**30


def time_int8_layouts(model: nn.Module, repeats: int = 5) -> dict[str, float]:
    """Seconds one row takes through the int8 layers a decoding step runs (decoding_int8_layers, the first
    LAYOUT_PROBE_BYTES of them) in each layout a compiled CPU step can multiply them in: {"plain": PyTorch's
    kernel (`_weight_int8pack_mm`), "column blocks": blocked_int8_matmul compiled}; the fastest of the passes over
    them, each reading the model's own weights from memory as a step does. Which is faster depends on the processor
    (the blocks 1.1-1.7x the kernel on an AMD EPYC, 0.55-0.7x at 7B widths on an Intel Xeon with AMX), so a compiled
    engine asks (engine.INT8_LAYOUT). The layers timed end in the plain layout; {} when there are none."""
    global _compiled_blocked_matmuls
    layers = probe_layers(decoding_int8_layers(model), 1, whole=LAYOUT_PROBE_GROUP)
    if not layers:
        return {}

    def lay_out(blocked: bool):
        lay_out_int8_layers(layers, blocked)
        # sizes fixed, as the engine's compiled step has them (engine.mark_weights_static): with symbolic ones
        # inductor's loop ran ~2x slower, and the probe chose the plain layout where the step decoded 1.3x faster in
        # blocks (7B widths, a Zen 5 AMD EPYC; BENCHMARKS.md)
        if blocked:
            for layer in layers:
                torch._dynamo.mark_static(layer.weight)
                torch._dynamo.mark_static(layer.scales)

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, layer.in_features, generator=generator).to(layer.scales.dtype) for layer in layers]
    groups = [slice(i, i + LAYOUT_PROBE_GROUP) for i in range(0, len(layers), LAYOUT_PROBE_GROUP)]
    if _compiled_blocked_matmuls is None:
        # (groups of a few layers: one graph per pattern of shapes, called once per decoder layer, where one graph
        # over all of them would take about as long to compile as the model's step; the shapes being fixed (lay_out),
        # each model's patterns are graphs of their own, within the engine's COMPILED_GRAPHS_LIMIT)
        _compiled_blocked_matmuls = torch.compile(_blocked_matmuls, dynamic=True)

    def plain():
        for x, layer in zip(rows, layers):
            layer(x)

    def blocked():
        for group in groups:
            _compiled_blocked_matmuls(rows[group], [layer.weight for layer in layers[group]],
                                      [layer.scales for layer in layers[group]])

    # plain, blocks, plain again: a shared machine's slow spell during one of the plain passes (measured: a min of 5
    # passes of 21 ms in one call, 43 ms in the next) does not decide alone
    return fastest_passes([("plain", lambda: lay_out(False), plain), ("column blocks", lambda: lay_out(True), blocked),
                           ("plain", lambda: lay_out(False), plain)], repeats)


def decoding_bf16_layers(model: nn.Module) -> list[FastLinear]:
    """A LlavaModel's bfloat16 FastLinear layers that decoding steps run (the decoder's, the lm_head's) and that can
    take oneDNN's blocked layout: the layers time_bf16_layouts times and lay_out_bf16_weights lays out."""
    return [module for name, module in model.named_modules()
            if isinstance(module, FastLinear) and runs_in_decoding(name) and can_pack(module.weight)]


def lay_out_bf16_weights(layers: list[FastLinear], packed: bool) -> None:
    for layer in layers:  # one at a time: the model's memory grows by one layer at most
        if layer.packed != packed:
            layer.pack() if packed else layer.unpack()
            release_free_memory()


def time_bf16_layouts(layers: list[FastLinear], repeats: int = 5) -> dict[str, float]:
    """Seconds one row takes through bfloat16 layers a decoding step runs (a model's decoding_bf16_layers, or stand-ins
    of their shapes, bf16_stand_ins; the first LAYOUT_PROBE_BYTES of them) in each layout: {"blocked": oneDNN on the
    reordered weights, "plain": torch.mv on the plain ones}; the fastest of the passes. Which is faster depends on the
    processor (on an Intel Xeon with AMX, plain 1.3-2.5x; on the AMD EPYC oneDNN's blocked layout read 77% of the
    bandwidth at 7B). The layers timed end in the plain layout; {} when there are none."""
    layers = probe_layers(layers, 2)
    if not layers:
        return {}
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, layer.in_features, generator=generator).bfloat16() for layer in layers]

    def run():
        for x, layer in zip(rows, layers):
            onednn_linear(x, layer.weight, layer.bias)  # (as an eager step calls it)

    # plain, blocked, plain again: a shared machine's slow spell during one pass does not decide alone
    blocked, plain = (lambda: lay_out_bf16_weights(layers, True)), (lambda: lay_out_bf16_weights(layers, False))
    return fastest_passes([("plain", plain, run), ("blocked", blocked, run), ("plain", plain, run)], repeats)


def bf16_stand_ins(shapes: list[tuple[int, int]]) -> list[FastLinear]:
    """Plain bfloat16 layers of these (out, in) shapes, as many as time_bf16_layouts times (the first
    LAYOUT_PROBE_BYTES), each weight one constant: the layouts timed before a model's weights are loaded, on weights
    of their shapes (a matmul's speed does not depend on the values), so that loading lays each layer out as it is
    read instead of reordering them all afterwards, holding one in both layouts beside the loaded model."""
    with torch.device("meta"):
        probe = probe_layers([nn.Linear(i, o, bias=False) for o, i in shapes], 2)
    stand_ins = []
    for linear in probe:
        linear.weight = nn.Parameter(torch.full((linear.out_features, linear.in_features), 1 / 64,
                                                dtype=torch.bfloat16), requires_grad=False)
        stand_ins.append(FastLinear(linear))
    return stand_ins


def float32_fast_linears(model: nn.Module) -> list[tuple[str, FastLinear]]:
    """A model's float32 FastLinear layers, by name: those whose kernel the engine chooses (time_float32_kernels)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, FastLinear) and m.weight.dtype == torch.float32 and not m.packed]


def time_float32_kernels(model: nn.Module, repeats: int = 5) -> dict[str, float]:
    """Seconds one float32 row takes through the layers a decoding step runs (the first LAYOUT_PROBE_BYTES of
    them) with each kernel: {"oneDNN": oneDNN's matmul, "PyTorch": F.linear (MKL's where PyTorch has it)}; the
    fastest of the passes. On an AMD EPYC oneDNN's read the weights at twice MKL's speed; on an Intel Xeon with AMX
    PyTorch's was the faster, ~1.15x for medium's answers and decoding (BENCHMARKS.md). The layers timed are left
    on the kernel they had; {} when there are none."""
    layers = probe_layers([layer for name, layer in float32_fast_linears(model) if runs_in_decoding(name)], 4)
    return time_one_row_both_ways(layers, "onednn", ("oneDNN", "PyTorch"), torch.float32, repeats) if layers else {}


def probe_layers(layers: list[nn.Module], bytes_per_weight: int, whole: int = 1) -> list[nn.Module]:
    """The first whole layers of `layers` holding LAYOUT_PROBE_BYTES of weights, in whole groups of `whole` layers:
    what a timing of their forms reads (enough to come from memory, as a decoding step's do, not from the cache)."""
    probe, weight_bytes = [], 0
    for layer in layers:
        if weight_bytes >= LAYOUT_PROBE_BYTES and len(probe) % whole == 0:
            break
        probe.append(layer)
        weight_bytes += layer.in_features * layer.out_features * bytes_per_weight
    return probe


def time_one_row_both_ways(layers: list[nn.Module], switch: str, names: tuple[str, str], dtype: torch.dtype,
                           repeats: int) -> dict[str, float]:
    """{names[0]: seconds, names[1]: seconds} one row takes through `layers` with their boolean attribute `switch`
    True, then False; the fastest of the passes, the first way timed again after the second (a shared machine's
    slow spell during one pass does not decide alone). The layers are left as they were."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, layer.in_features, generator=generator).to(dtype) for layer in layers]

    def run():
        for x, layer in zip(rows, layers):
            layer(x)

    def set_to(value: bool):
        for layer in layers:
            setattr(layer, switch, value)

    had = [getattr(layer, switch) for layer in layers]
    try:
        return fastest_passes([(names[0], lambda: set_to(True), run), (names[1], lambda: set_to(False), run),
                               (names[0], lambda: set_to(True), run)], repeats)
    finally:
        for layer, value in zip(layers, had):
            setattr(layer, switch, value)


def decoding_w8a8_layers(model: nn.Module) -> list["W8A8Linear"]:
    """A LlavaModel's CPU w8a8 layers that decoding steps run: whose one-row form the engine chooses."""
    return [module for name, module in model.named_modules()
            if isinstance(module, W8A8Linear) and runs_in_decoding(name) and module.weight.device.type == "cpu"]


def time_w8a8_one_row(model: nn.Module, repeats: int = 5) -> dict[str, float]:
    """Seconds one row takes through the w8a8 layers a decoding step runs (the first LAYOUT_PROBE_BYTES of them) in
    each form: {"int8 rows": quantized and multiplied by torch._int_mm, "weight-only": int8's kernel on the 16-bit
    row}; the fastest of the passes. _int_mm was 1.2-1.7x the kernel on two AMD EPYCs and 0.8x at 7B widths on an
    Intel Xeon with AMX (BENCHMARKS.md). The layers are left in the form they had; {} when there are none."""
    layers = probe_layers(decoding_w8a8_layers(model), 1)
    if not layers:
        return {}
    return time_one_row_both_ways(layers, "one_row_int8", ("int8 rows", "weight-only"), layers[0].scales.dtype, repeats)


def pack_all(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, each quantized linear's weights counted as the float ones they stand for (buffers of
    int8 or packed int4 there, not parameters)."""
    count = sum(p.numel() for p in model.parameters())
    tied = getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if tied and name == "lm_head":  # its weights are the embedding's, counted once (a quantized copy here)
            continue
        if isinstance(module, (Int8Linear, Int4Linear)):
            count += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
    return count


def describe(converted: dict[str, str]) -> str:
    """'int4/g128 x 96, int8 x 1' for a model's converted layers."""
    return ", ".join(f"{kind} x {n}" for kind, n in sorted(Counter(converted.values()).items()))


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a quantized model needs to be rebuilt: parameters and persistent buffers, by module path."""
    state = {name: t for name, t in model.named_parameters()}
    state.update({name: t for name, t in model.named_buffers() if not name.endswith("inv_freq")})
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear) and module.weight is None:  # kept only in the CPU kernel's layout
            state[f"{name}.weight" if name else "weight"] = pack_nibbles(module.values())
        if isinstance(module, Int8Linear) and module.blocked:  # laid out for compiled steps
            state[f"{name}.weight" if name else "weight"] = module.values().contiguous()
        if isinstance(module, FastLinear) and module.packed:  # a float layer in oneDNN's layout (conversion_plan)
            state[f"{name}.weight" if name else "weight"] = module.weight.to_dense()
    return state
