"""Errors at the edges: every fxp op refuses tensors on mixed devices (a meta weight used to return uninitialized
memory), 0-d norm inputs and attention positions outside the KV cache; the CLI refuses bad flags in one line.

Each case checks that the error names the op or flag, the argument, and what to change, and that nothing ran.
"""
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxpasses  # noqa: F401  (registers torch.ops.fxp)
from fxpasses.cli import main
from fxpasses.testing import fake_process_group

fxp = torch.ops.fxp
GROUP = object()  # stands for the fake process group's name in the argument lists below


def norm_inputs(shape=(3, 8), device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    return {"x": x, "residual": torch.randn(shape, generator=g).to(device),
            "weight": (torch.rand(shape[-1], generator=g) + 0.5).to(device),
            "scale": torch.tensor([0.1], device=device), "cos": torch.randn(shape[-1], generator=g).to(device),
            "sin": torch.randn(shape[-1], generator=g).to(device), "gate": x, "up": torch.randn(shape, generator=g).to(device)}


# op name -> its arguments, by schema name; GROUP is replaced by the fake process group's name
OPS = {
    "rms_norm": ["x", "weight", 1e-6],
    "add_rms_norm": ["x", "residual", "weight", 1e-6],
    "allreduce_add_rms_norm": ["x", "residual", "weight", 1e-6, GROUP],
    "quant_fp8": ["x", "scale"],
    "rms_norm_quant_fp8": ["x", "weight", 1e-6, "scale"],
    "add_rms_norm_quant_fp8": ["x", "residual", "weight", 1e-6, "scale"],
    "allreduce_add_rms_norm_quant_fp8": ["x", "residual", "weight", 1e-6, "scale", GROUP],
    "rotary_embedding": ["x", "cos", "sin", True],
    "silu_and_mul": ["gate", "up"],
}
NORMS = [name for name, args in OPS.items() if "weight" in args]
# every tensor argument after the first of every op, moved to meta in turn
MOVED = [(name, arg) for name, args in OPS.items() for arg in [a for a in args if isinstance(a, str)][1:]]
MOVED_CUDA = [pytest.param(n, a, id=f"{n}-{a}") for n, a in MOVED]


def call(name, tensors, group_name):
    args = [tensors[a] if isinstance(a, str) else group_name if a is GROUP else a for a in OPS[name]]
    return getattr(fxp, name)(*args)


@pytest.mark.parametrize("name, arg", MOVED, ids=[f"{n}-{a}" for n, a in MOVED])
def test_meta_argument_with_cpu_input_is_refused(name, arg):
    """A CPU input with one argument on meta dispatches to the Meta (fake) kernel, which used to return an empty CPU
    tensor: uninitialized memory instead of an error."""
    tensors = norm_inputs()
    tensors[arg] = tensors[arg].to("meta")
    first = next(a for a in OPS[name] if isinstance(a, str))
    with fake_process_group(2, 0) as world:
        with pytest.raises(ValueError, match=rf"fxp\.{name}: argument '{arg}' is on device meta but '{first}' is on "
                                             rf"cpu.*Move {arg} to cpu"):
            call(name, tensors, world.group_name)


@pytest.mark.parametrize("name, arg", MOVED, ids=[f"{n}-{a}" for n, a in MOVED])
def test_mixed_devices_fail_at_trace_time(name, arg):
    """The fake kernels check too: tracing a graph with the mismatch fails before anything runs."""
    tensors = norm_inputs()
    tensors[arg] = tensors[arg].to("meta")
    with fake_process_group(2, 0) as world, FakeTensorMode() as mode:
        fakes = {k: mode.from_tensor(v) for k, v in tensors.items()}
        with pytest.raises(ValueError, match=rf"fxp\.{name}: argument '{arg}' is on device meta"):
            call(name, fakes, world.group_name)


def test_mixed_devices_fail_in_torch_compile():
    weight = torch.empty(8, device="meta")

    def f(x):
        return fxp.rms_norm(x, weight, 1e-6)

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"argument 'weight' is on device meta but 'x' is on cpu"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.randn(3, 8))


def test_p2p_list_on_mixed_devices_is_refused():
    """A list with a meta tensor among CPU ones dispatched to the fake kernel: the CPU tensor was silently not sent."""
    from fxpasses import Mapping, init_process_groups

    with fake_process_group(4, 1):
        g = init_process_groups(Mapping(world_size=4, rank=1, tp_size=2, pp_size=2))
        for op in (fxp.pp_send_tensors, fxp.pp_recv_tensors):
            with pytest.raises(ValueError, match=r"argument 'tensors\[1\]' is on device meta but 'tensors\[0\]' is on "
                                                 r"cpu.*Move tensors\[1\] to cpu"):
                op([torch.ones(3), torch.ones(3, device="meta")], 3, g.pp.group_name)


@pytest.mark.parametrize("name", NORMS + ["rotary_embedding"])
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_zero_dim_input_to_a_norm_is_refused(name, fake):
    """A 0-d input has no last dimension; the shape check used to raise a raw IndexError."""
    tensors = {k: v[..., :1] for k, v in norm_inputs().items()}
    tensors.update(x=torch.tensor(1.5), residual=torch.tensor(0.5))
    with fake_process_group(2, 0) as world, (FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()):
        with pytest.raises(ValueError, match=rf"fxp\.{name}: x is 0-d \(a scalar\).*"):
            call(name, tensors, world.group_name)


def attention_case(dtype=torch.float32, device="cpu"):
    from attention_ref import attention_inputs

    return list(attention_inputs(6, 4, 2, 8, 8, slots=4, max_len=16, dtype=dtype, device=device, pad=1))


@pytest.mark.parametrize("which, value, message", [
    ("position_ids", 16, r"token 1 has position_ids 16 but the caches hold 16 positions per slot \(0\.\.15\); "
                         r"allocate caches with a larger max_len"),
    ("position_ids", 1000, r"token 1 has position_ids 1000 but the caches hold 16 positions"),
    ("position_ids", -1, r"token 1 has position_ids -1; positions count from 0"),
    ("slot_ids", 4, r"token 1 has slot_ids 4 but the caches have 4 slots \(0\.\.3\)"),
])
def test_attention_position_outside_the_cache_is_refused_on_cpu(which, value, message):
    """It used to raise a raw IndexError, and a negative position silently wrote the cache's last row. Nothing is
    written before the error."""
    q, k, v, kc, vc, slot, pos = case = attention_case()
    (pos if which == "position_ids" else slot)[1] = value
    before = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match=rf"fxp\.attention: {message}"):
        fxp.attention(*case, 0.5)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_attention_padded_token_may_have_any_position():
    """Padding (a negative slot) writes and reads nothing, so its position is not checked: the runner fills only
    the slots of padded rows."""
    q, k, v, kc, vc, slot, pos = case = attention_case()
    assert slot[-1] < 0
    pos[-1] = 10_000
    out = fxp.attention(*case, 0.5)
    assert not out[-1].any() and torch.isfinite(out).all()


@pytest.mark.parametrize("arg", ["k", "v", "k_cache", "v_cache", "slot_ids", "position_ids"])
def test_attention_argument_on_meta_is_refused(arg):
    names = ["q", "k", "v", "k_cache", "v_cache", "slot_ids", "position_ids"]
    case = attention_case()
    case[names.index(arg)] = case[names.index(arg)].to("meta")
    with pytest.raises(ValueError, match=rf"fxp\.attention: argument '{arg}' is on device meta but 'q' is on cpu"):
        fxp.attention(*case, 0.5)


# ---- the CLI: each bad flag exits non-zero with one line that names it, before any rank starts ------------------
CLI_CASES = [
    (["--timeout", "0"], "argument --timeout: must be a finite number of seconds above 0, got 0"),
    (["--timeout", "-5"], "argument --timeout: must be a finite number of seconds above 0"),
    (["--timeout", "inf"], "argument --timeout: must be a finite number of seconds above 0"),
    (["--steps", "-1"], "argument --steps: must be at least 0, got -1"),
    (["--steps", "60"], "argument --steps: 60 decode steps outgrow the model's KV cache (64 positions per sequence); "
                        "use --steps 59 or fewer"),
    (["--tp", "0"], "argument --tp: must be at least 1, got 0"),
    (["--tp", "two"], "argument --tp: expected an integer, got 'two'"),
    (["--pp", "0"], "argument --pp: must be at least 1, got 0"),
    (["--layers", "0"], "argument --layers: must be at least 1, got 0"),
    (["--layers", "1", "--pp", "2"], "argument --layers: 1 layers cannot be split over --pp 2 pipeline stages; "
                                     "use --layers 2 or more, or --pp 1 or fewer"),
    (["--tp", "3", "--pp", "1"], "--model llama does not fit --tp 3 --pp 1: num_heads (4) is not divisible by "
                                 "tp_size (3)"),
]


@pytest.mark.parametrize("flags, message", CLI_CASES, ids=[" ".join(f) for f, _ in CLI_CASES])
def test_cli_bad_flag_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", *flags])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("fxpasses demo: error: "), err
    assert message in err


def test_cli_dump_naming_a_file_is_one_line(tmp_path, capsys):
    existing = tmp_path / "graphs.txt"
    existing.write_text("not a directory")
    for path, message in [(existing, f"argument --dump: '{existing}' is an existing file, not a directory"),
                          (existing / "sub", f"argument --dump: cannot create directory '{existing / 'sub'}': Not "
                                             "a directory")]:
        with pytest.raises(SystemExit) as info:
            main(["demo", "--dump", str(path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert existing.read_text() == "not a directory"


def test_cli_error_from_the_command_line_has_no_traceback():
    """The same through ``python -m fxpasses``, as a user types it."""
    proc = subprocess.run([sys.executable, "-m", "fxpasses", "demo", "--tp", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "fxpasses demo: error: argument --tp: must be at least 1, got 0 " \
                                  "(see fxpasses demo --help)"


# ---- CUDA: the Triton kernels run the same checks (they dispatch on the CUDA argument, wherever the others are) ---
@pytest.mark.gpu
@pytest.mark.parametrize("name, arg", MOVED_CUDA)
def test_cpu_argument_with_cuda_input_is_refused(name, arg):
    tensors = norm_inputs(device="cuda")
    tensors[arg] = tensors[arg].cpu()
    with fake_process_group(2, 0) as world:
        with pytest.raises(ValueError, match=rf"fxp\.{name}: argument '{arg}' is on device cpu but .* is on cuda"):
            call(name, tensors, world.group_name)


@pytest.mark.gpu
@pytest.mark.parametrize("arg", ["k_cache", "slot_ids", "position_ids"])
def test_attention_cpu_argument_with_cuda_input_is_refused(arg):
    names = ["q", "k", "v", "k_cache", "v_cache", "slot_ids", "position_ids"]
    case = attention_case(device="cuda")
    case[names.index(arg)] = case[names.index(arg)].cpu()
    with pytest.raises(ValueError, match=rf"fxp\.attention: argument '{arg}' is on device cpu but 'q' is on cuda"):
        fxp.attention(*case, 0.5)
