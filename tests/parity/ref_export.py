"""Run with the reference package's venv (PyPI mblm 0.4.2), never ours.

Builds reference models for a set of cases, runs them on fixed inputs and saves, per case,
``{case}.pth`` (``{"MODEL": state_dict, "LOSS": ...}`` as the reference trainer writes),
``{case}.yaml`` (a config with a ``params`` section, as the reference trainer dumps) and
``{case}.io.pt`` (inputs and outputs, and seeded ``generate`` outputs). Usage: ref_export.py
OUT_DIR
"""

import sys
from pathlib import Path

import torch
import yaml

from mblm import MBLM, MBLMModelConfig, MBLMReturnType

T = {"block_type": "transformer", "attn_head_dims": 8, "attn_num_heads": 2}

CASES = {
    "t1": dict(
        hidden_dims=[32],
        seq_lens=[48],
        num_layers=[2],
        block={**T, "attn_use_rot_embs": True, "pos_emb_type": "fixed"},
    ),
    "t2": dict(
        hidden_dims=[48, 32],
        seq_lens=[8, 6],
        num_layers=[2, 2],
        block=[
            {**T, "attn_use_rot_embs": True, "pos_emb_type": "fixed"},
            {**T, "attn_use_rot_embs": False, "pos_emb_type": "rope", "ff_multiplier": 3},
        ],
    ),
    "t3": dict(
        hidden_dims=[40, 32, 16],
        seq_lens=[4, 3, 4],
        num_layers=[1, 2, 1],
        train_checkpoint_chunks=[2, 3],
        block=[
            {**T, "attn_use_rot_embs": True, "pos_emb_type": None},
            {**T, "attn_use_rot_embs": True, "pos_emb_type": "fixed"},
            {**T, "attn_use_rot_embs": True, "pos_emb_type": "rope"},
        ],
    ),
    "m1t": dict(
        hidden_dims=[32, 16],
        seq_lens=[8, 4],
        num_layers=[2, 1],
        block=[
            {
                "block_type": "mamba1",
                "d_state": 8,
                "d_conv": 4,
                "expand": 2,
                "headdim": 8,
                "pos_emb_type": None,
            },
            {**T, "attn_use_rot_embs": True, "pos_emb_type": "fixed"},
        ],
    ),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(CASES.items()):
        torch.manual_seed(1234 + i)
        cfg = MBLMModelConfig.model_validate(
            {"num_tokens": 257, "pad_token_id": 256, "train_checkpoint_chunks": None, **spec}
        )
        model = MBLM(cfg).eval()
        with torch.no_grad():  # random, non-trivial weights everywhere (pos embs, norms ...)
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        max_len = 1
        for s in cfg.seq_lens:
            max_len *= s
        lengths = sorted({max_len, max(1, max_len - 5), max_len // 2 + 1})
        io = {"cases": []}
        for length in lengths:
            ids = torch.randint(0, 256, (2, length))
            ids[1, -2:] = 256  # trailing pad ids in one row
            mask = (torch.rand(2, length) > 0.3).float()
            with torch.no_grad():
                io["cases"].append(
                    {
                        "ids": ids,
                        "mask": mask,
                        "logits": model(ids, return_type=MBLMReturnType.LOGITS),
                        "loss": model(ids, return_type=MBLMReturnType.LOSS),
                        "loss_masked": model(ids, return_type=MBLMReturnType.LOSS, loss_mask=mask),
                    }
                )
        # sampling: the same global seed must give the same bytes on our side
        io["generate"] = []
        for kwargs in ({}, {"filter_thres": 0.5, "temperature": 0.9}, {"filter_thres": 0.0}):
            prime = torch.randint(0, 256, (3,))
            torch.manual_seed(5)
            ids = model.generate(prime, num_tokens_to_generate=20, enable_progress=False, **kwargs)
            io["generate"].append({"prime": prime, "kwargs": kwargs, "seed": 5, "out": ids})
        torch.save({"MODEL": model.state_dict(), "LOSS": 0.0}, out / f"{name}.pth")
        params = {**cfg.model_dump(mode="json"), "input_seq_len": max_len}
        (out / f"{name}.yaml").write_text(yaml.safe_dump({"params": params}))
        torch.save(io, out / f"{name}.io.pt")
        print(name, "ok", lengths)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
