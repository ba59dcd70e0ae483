"""``python -m lecture_kit``: a one-minute check that every form of every mixer agrees on this machine.

For each mixer, random inputs (ragged length, non-zero initial state) are run through every form in
fp64 and compared with the recurrence, the definition; the table prints the worst relative-RMS error
over outputs and final states.
"""
import torch

from . import DEVICE
from .testing import TOLERANCE, MIXERS, errors, matrix_args, mixer, random_inputs, values_of


def form_errors(name, length=100, chunk_size=16):
    m = mixer(name)
    args, kw = random_inputs(name, length=length, initial_state=True, device=DEVICE)
    ref, ref_state = m.recurrent(*args, **kw, output_final_state=True)
    worst = {}
    for form, run in (("parallel", m.parallel), ("chunked", lambda *a, **k: m.chunked(*a, **k, chunk_size=chunk_size))):
        out, state = run(*args, **kw, output_final_state=True)
        worst[form] = max(errors(out, ref).rel_rms, errors(state, ref_state).rel_rms)
    plain, _ = m.recurrent(*args, **{k: v for k, v in kw.items() if k != "initial_state"})
    product = torch.einsum("bhij,bjhv->bihv", m.matrix(*matrix_args(name, args)), values_of(name, args))
    if name == "ssd":
        product = product + args[0] * kw["D"][:, None]
    worst["matrix @ v"] = errors(product, plain).rel_rms
    return worst


def main():
    bound = TOLERANCE["fp64"][0]
    print(f"lecture_kit on {DEVICE}: every form vs the fp64 recurrence (T = 100, chunk 16, initial state)")
    print(f"{'mixer':8s} {'parallel':>10s} {'chunked':>10s} {'matrix @ v':>11s}")
    ok = True
    for name in MIXERS:
        e = form_errors(name)
        ok &= all(v <= bound for v in e.values())
        print(f"{name:8s} {e['parallel']:10.1e} {e['chunked']:10.1e} {e['matrix @ v']:11.1e}")
    print(("✓ all forms agree" if ok else "✗ disagreement") + f" (relative RMS error ≤ {bound:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
