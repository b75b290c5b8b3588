"""This process's place in a multi-process launch (torchrun / `accelerate launch`), through
accelerate's PartialState: one model copy per process, GPU or CPU (gloo). A plain single-process
run is rank 0 of 1 and needs no process group; every helper is then a no-op."""

from __future__ import annotations

import os

import torch


class Shard:
    def __init__(self, rank: int = 0, world: int = 1, state=None, device=None):
        self.rank, self.world, self.state, self.device = rank, world, state, device

    @classmethod
    def current(cls, device: str = "auto") -> "Shard":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        # late: accelerate costs ~0.4 s to import and a lone process never needs it
        from accelerate import PartialState

        # Without CUDA, accelerate must be told to form a CPU (gloo) group.
        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state, state.device)

    def device_for(self, requested: str) -> str:
        """The device to load this process's model copy on: with several processes and
        `--device auto`, the one accelerate assigned to this process."""
        return str(self.device) if self.world > 1 and requested == "auto" else requested

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, value):
        """Process 0's `value` (any picklable object), on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list  # late: see current()

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (same shape everywhere) concatenated along dim 0 in rank order."""
        if self.state is None:
            return tensor
        from accelerate.utils import gather  # late: see current()

        return gather(tensor)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise sum of `tensor` over all processes."""
        if self.state is not None:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor
