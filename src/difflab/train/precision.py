"""Training precision, chosen once: the autocast dtype, and the loss scaling that fp16 needs.

- "fp32": no autocast.
- "bf16": autocast to bfloat16 (CPU and GPU). bf16 keeps fp32's exponent range, so no loss scaling.
  CPUs without AVX512-BF16 or AMX run bf16 matmuls through a slow fallback: there it saves nothing.
- "fp16": autocast to float16 with dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision
  Training", Sec. 3.2): the loss is multiplied by a scale before backward so small gradients do not
  underflow, the gradients are unscaled before clipping, and steps with inf/nan gradients are skipped
  (``torch.amp.GradScaler``). CUDA only.

Weights, optimiser state and the loss reduction stay in fp32 in every mode.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from difflab.errors import DifflabError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in AUTOCAST_DTYPES:
            raise DifflabError(f"unknown train.precision {name!r}; choose one of {tuple(AUTOCAST_DTYPES)}")
        if name == "fp16" and device.type != "cuda":
            raise DifflabError("train.precision 'fp16' needs a CUDA device (loss scaling with GradScaler); "
                               "on the CPU use 'bf16' or 'fp32'")
        self.name, self.device_type, self.dtype = name, device.type, AUTOCAST_DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        """Context for the forward pass and loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, net: nn.Module, grad_clip: float | None) -> bool:
        """Clip the (unscaled) gradients to ``grad_clip`` in global norm, then take the optimiser step; returns
        False, without stepping, when the gradients hold inf or nan (their global norm, which clipping computes
        anyway, is not finite). With fp16 loss scaling such steps are the scaler's to skip (and it returns True)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        parameters = [p for p in net.parameters() if p.grad is not None]
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        else:                                        # the same global norm, without clipping
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])
                                            if parameters else torch.zeros(1))
        if self.scaler is None:
            if not torch.isfinite(norm):
                return False
            optimizer.step()
        else:
            self.scaler.step(optimizer)              # skipped when the gradients hold inf or nan
            self.scaler.update()
        return True

    def state_dict(self) -> dict:
        """The loss scaler's state (plain numbers, saved in the checkpoint's JSON metadata); {} without one."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
