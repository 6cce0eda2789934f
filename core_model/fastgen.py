"""The fast generation path: the whole of pixels -> captions as one CUDA graph per batch shape.

Stock decoding spends most of each step launching kernels and synchronising with the host
(FACTS.md: 7-13 ms per step on an H100 whatever the batch, against an arithmetic floor near
0.1 ms). Here the encoder, the prefix mapper, the prefill and every decoding step of
`CaptionModel.search(..., early_stop=False)` are captured once per (batch, beams, length,
image size) into a CUDA graph over a preallocated KV cache, and each batch is one replay: no
host synchronisation until the finished token ids are read back.

It runs the same search as the plain path (finished beams never change, so running to
max_new_tokens gives the same captions as stopping early). On the CPU, or with graphs off,
it runs the same code eagerly, which is how the tests check it against the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import BeamState, CaptionModel, Hypothesis


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # static input buffer
    state: BeamState  # static output tensors, rewritten by every replay


class FastGenerator:
    """Wraps a CaptionModel for sync-free, graph-captured greedy and beam decoding."""

    def __init__(
        self,
        model: CaptionModel,
        dtype: torch.dtype | None = None,
        use_cuda_graphs: bool | None = None,
        compile_encoder: bool = False,
    ):
        self.model = model.eval()
        self.device = model.device
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.model.to(self.dtype)
        self.use_cuda_graphs = cuda if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and not cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if compile_encoder:
            self.model.encoder.forward_features = torch.compile(self.model.encoder.forward_features)
        self._graphs: dict[tuple, _Captured] = {}

    @torch.no_grad()
    def _run(self, pixels: torch.Tensor, K: int, max_new: int, min_new: int) -> BeamState:
        prefix = self.model.prefix(self.model.encode(pixels))
        return self.model.search(prefix, max_new, K, min_new, early_stop=False)

    def _capture(self, pixels: torch.Tensor, K: int, max_new: int, min_new: int) -> _Captured:
        static = pixels.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation stays out of the graph
            for _ in range(2):
                self._run(static, K, max_new, min_new)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            state = self._run(static, K, max_new, min_new)
        return _Captured(graph, static, state)

    @torch.no_grad()
    def search(
        self, pixels: torch.Tensor, num_beams: int = 1, max_new_tokens: int | None = None, min_new_tokens: int = 0
    ) -> BeamState:
        """Run the search; returns the BeamState (device tensors; copy them before the next call)."""
        max_new = max_new_tokens or self.model.cfg.max_caption_tokens
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        if not self.use_cuda_graphs:
            return self._run(pixels, num_beams, max_new, min_new_tokens)
        key = (tuple(pixels.shape), num_beams, max_new, min_new_tokens)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(pixels, num_beams, max_new, min_new_tokens)
        captured.pixels.copy_(pixels)
        captured.graph.replay()
        return captured.state

    def generate(
        self,
        pixels: torch.Tensor,
        num_beams: int = 1,
        n_best: int = 1,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
    ) -> list[list[Hypothesis]]:
        """Same contract as CaptionModel.generate for greedy and beam search."""
        num_beams = max(num_beams, n_best)
        state = self.search(pixels, num_beams, max_new_tokens, min_new_tokens)
        return state.results(n_best, self.model.eos_id)
