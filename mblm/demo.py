"""A short, self-contained model demo on the bundled corpus (no Ray, no MLflow).

Trains a small 2-stage Transformer MBLM on windows of the Python standard library's source
files (present on every machine with Python), prints loss and bits per byte as it goes,
saves the model and streams a sample to the terminal.
"""

from __future__ import annotations

import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

from mblm import MBLM, MBLMModelConfig, MBLMReturnType
from mblm.model.checkpoint import save_model
from mblm.utils.stream import ByteStreamer

DEMO_CONFIG = {
    "num_tokens": 257,
    "pad_token_id": 256,
    "hidden_dims": [192, 96],
    "seq_lens": [64, 8],
    "num_layers": [3, 2],
    "block": {
        "block_type": "transformer",
        "attn_head_dims": 32,
        "attn_num_heads": 4,
        "attn_use_rot_embs": True,
        "pos_emb_type": "fixed",
    },
}


def stdlib_corpus(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated ``*.py`` sources of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not out:
        raise FileNotFoundError(f"no *.py files under the standard library folder {root}")
    return b"\n".join(out)


def run_demo(steps: int, seconds: float, out_dir: Path, batch: int = 8, seed: int = 0) -> float:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    split = int(len(corpus) * 0.95)
    cfg = MBLMModelConfig.model_validate(DEMO_CONFIG)
    window = cfg.max_seq_len
    model = MBLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    nparams = sum(p.numel() for p in model.parameters())
    print(f"demo: {nparams:,} parameters, {window}-byte windows, corpus {len(corpus):,} bytes")

    def sample(lo: int, hi: int) -> torch.Tensor:
        starts = [rng.randrange(lo, hi - window) for _ in range(batch)]
        return torch.stack([corpus[s : s + window] for s in starts])

    valid = sample(split, len(corpus))

    def valid_bpb() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(valid, return_type=MBLMReturnType.LOSS).item()
        model.train()
        return loss / math.log(2)

    print(f"step 0: valid bits/byte {valid_bpb():.3f}")
    t0, step = time.perf_counter(), 0
    while step < steps and time.perf_counter() - t0 < seconds:
        loss = model(sample(0, split), return_type=MBLMReturnType.LOSS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            rate = step * batch * window / (time.perf_counter() - t0)
            print(f"step {step}: train loss {loss.item():.3f}, {rate:,.0f} bytes/s", flush=True)
    bpb = valid_bpb()
    print(f"step {step}: valid bits/byte {bpb:.3f} ({time.perf_counter() - t0:.0f} s)")
    path = save_model(model, out_dir / "model.pt")
    print(f"saved {path}")
    prompt = torch.tensor(list(b"def "), dtype=torch.long)
    print("sample: def ", end="", flush=True)
    model.eval()
    with ByteStreamer(sys.stdout, decode_utf8=True) as streamer:
        model.generate(
            prompt, stream=streamer, num_tokens_to_generate=120, temperature=0.8, filter_thres=0.9
        )
    print()
    return bpb
