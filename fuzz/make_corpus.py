#!/usr/bin/env python3
"""Writes the fuzzer's seed corpus (fuzz/corpus) and regression files (fuzz/regressions).

    python fuzz/make_corpus.py               # regenerate both folders (needs torch and safetensors)
    python fuzz/make_corpus.py --check LOG   # check a LORAFUSE_FUZZ_PRINT_ERRORS=1 fuzzer log (run.sh)

Seeds are valid files, most written by the reference `safetensors` package (and all loaded back by it), a few
laid out by hand where the reference writer never would (tensors out of header order, extra whitespace).
Regressions are one small malformed file per rule of the parser, named after the rule; REGRESSIONS below
holds the part of csrc/io/safetensors.cpp's message that each must be rejected with. The nf4_* seeds and
regressions are NF4 weights as a Hugging Face 4-bit checkpoint stores them (bitsandbytes' own bytes and quant_state),
for the NF4 reader (csrc/io/nf4_tensors.cpp) that the fuzzer runs on every accepted file; NF4_REGRESSIONS holds their
messages. Files named crash_*
are inputs that crashed the fuzzer (bugs to fix in csrc); they must be rejected cleanly once fixed.
Output is deterministic: rerunning gives the same bytes.
"""

import argparse
import json
import re
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"


def raw(header, data=b"", header_len=None):
    """A safetensors file: 8-byte little-endian header length, header (a dict, str or bytes), data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


F32x2 = entry("F32", [2], 0, 8)  # a well-formed entry for 8 bytes of data

# name -> (bytes, the part of the parser's message that the rejection must contain)
REGRESSIONS_TABLE = {
    "short_file": (b"\x02\x00\x00", "shorter than the 8-byte header length"),
    "header_past_end": (raw("{}", header_len=64), "runs past the end of the file"),
    "header_over_limit": (raw("{}", header_len=100_000_001), "exceeds the limit of 100000000 bytes"),
    "invalid_utf8": (raw(b'{"a\xff":' + json.dumps(F32x2).encode() + b"}", bytes(8)), "ill-formed UTF-8"),
    "not_json": (raw('{"a":{"dtype":"F32",'), "not valid UTF-8 JSON"),
    "not_an_object": (raw("[1,2]"), "the header must be a JSON object, found array"),
    "entry_not_object": (
        raw({"a": [0, 8]}, bytes(8)),
        'tensor "a": expected {dtype, shape, data_offsets}, found array',
    ),
    "unknown_field": (raw({"a": {**F32x2, "strides": [1]}}, bytes(8)), 'unknown field "strides"'),
    "missing_field": (
        raw({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
        "expected the fields dtype, shape and",
    ),
    "dtype_not_string": (raw({"a": entry(4, [2], 0, 8)}, bytes(8)), "dtype must be a string, found 4"),
    "unknown_dtype": (raw({"a": entry("F128", [2], 0, 16)}, bytes(16)), 'unknown dtype "F128"'),
    "shape_not_array": (raw({"a": entry("F32", 2, 0, 8)}, bytes(8)), "shape must be an array, found 2"),
    "shape_negative": (
        raw({"a": entry("F32", [-2], 0, 8)}, bytes(8)),
        "shape: expected a non-negative integer, found -2",
    ),
    "shape_not_integer": (
        raw({"a": entry("F32", [2.0], 0, 8)}, bytes(8)),
        "shape: expected a non-negative integer, found 2.0",
    ),
    "shape_dimension_too_large": (
        raw({"a": entry("F32", [0, 2**63], 0, 0)}),
        "dimension 9223372036854775808 is too large",
    ),
    "shape_overflow": (
        raw({"a": entry("F32", [2**32, 2**31, 2], 0, 8)}, bytes(8)),
        "overflows 64 bits in bytes",
    ),
    "byte_length_mismatch": (
        raw({"a": entry("F32", [3], 0, 8)}, bytes(8)),
        "is 12 bytes, but data_offsets [0, 8] hold 8",
    ),
    "data_offsets_not_pair": (
        raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, bytes(8)),
        "data_offsets must be [begin, end]",
    ),
    "data_offsets_negative": (
        raw({"a": entry("F32", [2], -8, 0)}, bytes(8)),
        "data_offsets: expected a non-negative integer",
    ),
    "data_offsets_not_integer": (
        raw({"a": entry("F32", [2], 0, "8")}, bytes(8)),
        'expected a non-negative integer, found "8"',
    ),
    "data_offsets_reversed": (raw({"a": entry("U8", [0], 8, 0)}, bytes(8)), "end before they begin"),
    "offsets_not_from_zero": (
        raw({"a": entry("F32", [2], 4, 12)}, bytes(12)),
        'tensor "a" starts at byte 4 of the data (a gap',
    ),
    "gap": (
        raw({"a": F32x2, "b": entry("F32", [2], 12, 20)}, bytes(20)),
        'tensor "b" starts at byte 12 of the data (a gap',
    ),
    "overlap": (
        raw({"a": F32x2, "b": entry("F32", [2], 4, 12)}, bytes(12)),
        "starts at byte 4 of the data (it overlaps",
    ),
    "overlap_zero_size_inside": (
        raw({"a": F32x2, "b": entry("F32", [0], 4, 4)}, bytes(8)),
        'tensor "b" starts at byte 4',
    ),
    "truncated_data": (raw({"a": F32x2}, bytes(4)), "the tensors need 8 bytes of data but the file has 4"),
    "trailing_bytes": (raw({"a": F32x2}, bytes(10)), "2 trailing bytes after the last tensor's data"),
    "duplicate_name": (
        raw(f'{{"a":{json.dumps(F32x2)},"a":{json.dumps(entry("F32", [2], 8, 16))}}}', bytes(16)),
        'duplicate tensor name "a"',
    ),
    "duplicate_metadata": (
        raw('{"__metadata__":{},"__metadata__":{}}'),
        'duplicate tensor name "__metadata__"',
    ),
    "metadata_not_object": (
        raw({"__metadata__": ["format", "pt"]}),
        "__metadata__ must be an object of strings, found array",
    ),
    "metadata_non_string": (
        raw({"__metadata__": {"format": "pt", "rank": 8}}),
        '__metadata__["rank"] must be a string, found number',
    ),
}

# NF4 weights whose checkpoint tensors break a rule of csrc/io/nf4_tensors.cpp: name -> (change to a valid weight,
# the part of the message). Built by nf4_files() (they need torch and bitsandbytes).
NF4_REGRESSIONS = {
    "nf4_quant_map_not_nf4": '"layer.weight.quant_map"[3] is 0.25',
    "nf4_unknown_field": 'quant_state: unknown field "extra"',
    "nf4_state_not_json": "quant_state: not valid JSON",
    "nf4_fp4": "lorafuse has NF4 kernels only",
    "nf4_absmax_count": '"layer.weight.absmax" has shape [16]',
    "nf4_packed_bytes": '"layer.weight" holds 512 bytes',
    "nf4_missing_nested_quant_map": 'no "layer.weight.nested_quant_map"',
    "nf4_nested_fields_apart": "go together",
}

# Weights in lorafuse's layout (formats other than NF4) that break a rule: name -> the part of the message.
NF_REGRESSIONS = {
    "nf_quant_map_not_nf3": '"layer.weight.quant_map"[2] is 0.25',
    "nf_unknown_field": 'quant_state: unknown field "extra"',
    "nf_bits_out_of_range": "format: bits: expected 2 .. 8, found 9",
    "nf_stat_fields_apart": "go together",
    "nf_codes_bytes": '"layer.weight.absmax" has shape [5]',
    "nf_two_states": "one weight has one quant_state",
}


def nf_files():
    """(seeds, regressions): a 32 x 64 weight in lorafuse's layout, NF3 in blocks of 32 with 4-bit statistics in blocks
    of 16 (bfloat16 scales), written by lorafuse's own writer, and the NF_REGRESSIONS made from it."""
    import json as json_module

    import lorafuse
    import torch
    from safetensors.torch import save

    weight = (torch.arange(32 * 64, dtype=torch.float64).remainder(41) * 0.09 - 1.7).to(torch.float32).reshape(32, 64)
    fmt = lorafuse.NfFormat(3, 32, 4, 16)
    q = lorafuse.quantize_nf(weight, fmt, torch.bfloat16)
    good = dict(lorafuse._C._nf4_checkpoint_tensors(
        "layer.weight", *q, 32, [32, 64], torch.float32, list(fmt), torch.bfloat16
    ))  # fmt: skip
    key = "layer.weight.quant_state.lorafuse__nf"

    def with_state(change):
        state = json_module.loads(bytes(good[key].tolist()))
        change(state)
        return {**good, key: _json_bytes(json_module.dumps(state))}

    quant_map = good["layer.weight.quant_map"].clone()
    quant_map[2] = 0.25
    changes = {
        "nf_quant_map_not_nf3": {**good, "layer.weight.quant_map": quant_map},
        "nf_unknown_field": with_state(lambda st: st.update(extra=1)),
        "nf_bits_out_of_range": with_state(lambda st: st.update(bits=9)),
        "nf_stat_fields_apart": with_state(lambda st: st.pop("stat_dtype")),
        "nf_codes_bytes": {**good, "layer.weight.absmax": good["layer.weight.absmax"][:5].clone()},
        "nf_two_states": {**good, "layer.weight.quant_state.bitsandbytes__nf4": good[key].clone()},
    }
    assert set(changes) == set(NF_REGRESSIONS)
    return {"nf3_nested": save(good)}, {name: save(t) for name, t in changes.items()}


def nf4_files():
    """(seeds, regressions): name -> bytes of NF4 weights as transformers + bitsandbytes save them (32 x 64, blocks of
    64), with and without double quantization, and the NF4_REGRESSIONS made from the double-quantized one."""
    import json as json_module

    import torch
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import save

    weight = (torch.arange(32 * 64, dtype=torch.float64).remainder(37) * 0.11 - 2).to(torch.float32).reshape(32, 64)

    def tensors(nested):
        packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
        out = {"layer.weight": packed}
        out.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        return out

    def with_state(t, change):
        state = json_module.loads(bytes(t["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
        change(state)
        return {**t, "layer.weight.quant_state.bitsandbytes__nf4": _json_bytes(json_module.dumps(state))}

    good = tensors(True)
    quant_map = good["layer.weight.quant_map"].clone()
    quant_map[3] = 0.25
    no_nested_map = {k: v for k, v in good.items() if k != "layer.weight.nested_quant_map"}
    changes = {
        "nf4_quant_map_not_nf4": {**good, "layer.weight.quant_map": quant_map},
        "nf4_unknown_field": with_state(good, lambda st: st.update(extra=1)),
        "nf4_state_not_json": {**good, "layer.weight.quant_state.bitsandbytes__nf4": _json_bytes('{"quant_type":')},
        "nf4_fp4": with_state(good, lambda st: st.update(quant_type="fp4")),
        "nf4_absmax_count": {**good, "layer.weight.absmax": good["layer.weight.absmax"][:16].clone()},
        "nf4_packed_bytes": {**good, "layer.weight": good["layer.weight"][:512].clone()},
        "nf4_missing_nested_quant_map": no_nested_map,
        "nf4_nested_fields_apart": with_state(good, lambda st: st.pop("nested_dtype")),
    }
    assert set(changes) == set(NF4_REGRESSIONS)
    seeds = {"nf4_nested": save(good, metadata={"format": "pt"}), "nf4_plain": save(tensors(False))}
    return seeds, {name: save(t) for name, t in changes.items()}


def _json_bytes(text):
    import torch

    return torch.tensor(list(text.encode()), dtype=torch.uint8)


# Inputs that crash the parser (bugs in csrc, open until fixed): once fixed, each must be rejected with a
# c10::Error (None: with any message). Too big for -max_len, so written here rather than found by fuzzing.
# crash_deep_nesting: a 100000-deep array inside a shape (200 KB, far below the 100 MB header bound). The
# parser builds it fine, but the "expected a non-negative integer, found <dump>" message calls
# nlohmann::json::dump(), which recurses once per level and overflows the stack: ASan reports a
# stack-overflow from about 25000 levels; an unsanitized -O2 build (and Python) dies of SIGSEGV at 100000.
_DEPTH = 100_000
CRASHES = {
    "crash_deep_nesting": (
        raw('{"a":{"dtype":"F32","shape":[' + "[" * _DEPTH + "]" * _DEPTH + '],"data_offsets":[0,0]}}'),
        None,
    ),
}


def seeds():
    """name -> bytes of a valid file."""
    import torch
    from safetensors.torch import save

    def ramp(n, dtype):  # deterministic, non-trivial values
        return (torch.arange(n, dtype=torch.float64) * 0.37 - 3).to(dtype)

    dtypes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    lora = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            lora[f"{prefix}.lora_A.weight"] = ramp(4 * 8, torch.bfloat16).reshape(4, 8)
            lora[f"{prefix}.lora_B.weight"] = ramp(8 * 4, torch.bfloat16).reshape(8, 4)
    out = {
        "empty": save({}),
        "one_tensor": save({"weight": ramp(6, torch.float32).reshape(2, 3)}),
        "all_dtypes": save({name.lower(): ramp(3, dt) for name, dt in dtypes.items()}),
        # by hand: the reference writer orders several metadata keys differently from run to run
        "metadata": raw(
            {
                "__metadata__": {"format": "pt", "note": "caf\u00e9 \u2713", "": ""},
                "w": entry("F16", [4], 0, 8),
            },
            ramp(4, torch.float16).numpy().tobytes(),
        ),
        "metadata_only": raw({"__metadata__": {"format": "pt"}}),
        "scalar": save({"s": torch.tensor(2.5, dtype=torch.float64), "flag": torch.tensor(True)}),
        "zero_sized": save(
            {
                "empty": torch.zeros(0, 4),
                "also_empty": torch.zeros(3, 0, dtype=torch.int8),
                "x": ramp(2, torch.float32),
            }
        ),
        "large_shape": save(
            {
                "huge_empty": torch.empty(0, 2**63 - 1),
                "rank8": ramp(8, torch.int16).reshape(1, 2, 1, 2, 1, 2, 1, 1),
                "wide": ramp(1024, torch.uint8),
            }
        ),
        "lora_adapter": save(lora, metadata={"format": "pt"}),
        # by hand: header order differs from data order, unicode (escaped and raw) names, whitespace padding
        "hand_layout": raw(
            '{ "\\u00e9t\\u00e9": {"data_offsets": [4, 8], "shape": [2], "dtype": "I16"},\n'
            '  "\u00e0": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},\n'
            '  "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]} }   \t\n',
            bytes(range(8)),
        ),
        "zero_sized_ties": raw(
            {
                "b": entry("F32", [0], 0, 0),
                "a": entry("I8", [0, 2], 0, 0),
                "c": entry("U8", [2], 0, 2),
                "d": entry("F16", [0], 2, 2),
            },
            b"\x01\x02",
        ),
    }
    out.update(nf4_files()[0])
    out.update(nf_files()[0])
    return out


def write_all():
    from safetensors.torch import load

    for folder in (CORPUS, REGRESSIONS):
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.safetensors"):
            old.unlink()
    seed_files = seeds()
    for name, data in seed_files.items():
        assert len(data) <= 4096, f"{name}: seeds stay within run.sh's -max_len"
        load(data)  # the reference reader accepts every seed
        (CORPUS / f"{name}.safetensors").write_bytes(data)
    for name, (data, _) in {**REGRESSIONS_TABLE, **CRASHES}.items():
        (REGRESSIONS / f"{name}.safetensors").write_bytes(data)
    nf4_regressions = {**nf4_files()[1], **nf_files()[1]}
    for name, data in nf4_regressions.items():
        load(data)  # a valid safetensors file: the NF4 reader rejects it
        (REGRESSIONS / f"{name}.safetensors").write_bytes(data)
    total = sum(p.stat().st_size for p in CORPUS.iterdir())
    print(
        f"{len(seed_files)} seeds ({total} bytes) in {CORPUS}, "
        f"{len(REGRESSIONS_TABLE) + len(CRASHES) + len(nf4_regressions)} regression files in {REGRESSIONS}"
    )


def check_log(log_path):
    """Each regression file in the log must have been rejected with its message, each seed accepted.
    libFuzzer prints "Running: FILE", then come the fuzzer's "rejected: MESSAGE" lines, "Executed FILE"."""
    regressions = {**NF4_REGRESSIONS, **NF_REGRESSIONS}
    expected = {**REGRESSIONS_TABLE, **CRASHES, **{name: (None, m) for name, m in regressions.items()}}
    seen = {}  # path -> rejection messages
    current = None
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if m := re.match(r"Running: (.*)", line):
            current = Path(m.group(1)).resolve()
            seen.setdefault(current, [])
        elif line.startswith("rejected: ") and current is not None:
            seen[current].append(line[len("rejected: ") :])
        elif line.startswith("Executed "):
            current = None
    bad = []
    for path, messages in sorted(seen.items()):
        name = path.stem
        if path.parent == CORPUS:
            if messages:
                bad.append(f'seed {name}: rejected with "{messages[0]}", but it is a valid file')
        elif name not in expected:
            bad.append(f"{name}: not listed in fuzz/make_corpus.py")
        elif not messages:
            bad.append(f"{name}: accepted, but it must be rejected")
        elif expected[name][1] is not None and not any(expected[name][1] in msg for msg in messages):
            bad.append(
                f'{name}: rejected with "{messages[0]}", expected a message containing "{expected[name][1]}"'
            )
    for line in bad:
        print(f"make_corpus.py --check: {line}", file=sys.stderr)
    print(f"make_corpus.py --check: {len(seen)} files, {len(bad)} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="LOG", help="check a LORAFUSE_FUZZ_PRINT_ERRORS=1 fuzzer log")
    args = parser.parse_args()
    sys.exit(check_log(args.check) if args.check else write_all())
