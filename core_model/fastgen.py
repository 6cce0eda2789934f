"""The fast generation path: pixels -> captions as CUDA graphs over a preallocated KV cache.

Stock decoding spends most of each step launching kernels and synchronising with the host
(FACTS.md: 7-13 ms per step on an H100 whatever the batch, against an arithmetic floor near
0.1 ms). Here two graphs are captured per (batch, beams, length, image size):

  encode graph: pixels -> encoder -> prefix mapper -> prefix (B, P, C)
  decode graph: prefix -> prefill -> every step of `CaptionModel.search(..., early_stop=False)`

and a batch is two replays with no host synchronisation until the token ids are read back.
`generate_many` runs them on two CUDA streams so that the compute-bound encoder of batch i+1
overlaps the latency-bound decoding of batch i.

It runs the same search as the plain path (finished beams never change, so running to
max_new_tokens gives the same captions as stopping early). On the CPU, or with graphs off,
it runs the same code eagerly, which is how the tests check it against the plain path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .model import BeamState, CaptionModel, Hypothesis


@dataclass
class _Graphs:
    encode: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # static input of the encode graph
    prefix: torch.Tensor  # its static output
    decode: torch.cuda.CUDAGraph
    prefix_in: torch.Tensor  # static input of the decode graph
    state: BeamState  # its static outputs, rewritten by every replay


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
        self._encode_fn = self._encode
        if compile_encoder:
            self._encode_fn = torch.compile(self._encode, dynamic=False)
        self._graphs: dict[tuple, _Graphs] = {}
        if cuda:
            self._enc_stream = torch.cuda.Stream(self.device)
            self._dec_stream = torch.cuda.Stream(self.device)

    # --- the two halves, eager ------------------------------------------------------------

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(self.model.encode(pixels))

    def _decode(self, prefix: torch.Tensor, K: int, max_new: int, min_new: int) -> BeamState:
        return self.model.search(prefix, max_new, K, min_new, early_stop=False)

    # --- capture --------------------------------------------------------------------------

    @torch.no_grad()
    def _capture(self, pixels: torch.Tensor, K: int, max_new: int, min_new: int) -> _Graphs:
        static_px = pixels.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation and compilation stay outside
            for _ in range(2):
                prefix = self._encode_fn(static_px)
                self._decode(prefix, K, max_new, min_new)
        torch.cuda.current_stream(self.device).wait_stream(side)
        enc = torch.cuda.CUDAGraph()
        with torch.cuda.graph(enc):
            static_prefix = self._encode_fn(static_px)
        prefix_in = static_prefix.clone()
        dec = torch.cuda.CUDAGraph()
        with torch.cuda.graph(dec):
            state = self._decode(prefix_in, K, max_new, min_new)
        return _Graphs(enc, static_px, static_prefix, dec, prefix_in, state)

    def _graphs_for(self, pixels: torch.Tensor, K: int, max_new: int, min_new: int) -> _Graphs:
        key = (tuple(pixels.shape), K, max_new, min_new)
        if key not in self._graphs:
            self._graphs[key] = self._capture(pixels, K, max_new, min_new)
        return self._graphs[key]

    # --- running --------------------------------------------------------------------------

    @torch.no_grad()
    def search(
        self,
        pixels: torch.Tensor,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
    ) -> BeamState:
        """Run one batch; returns the BeamState (device tensors; copy them before the next call)."""
        max_new = max_new_tokens or self.model.cfg.max_caption_tokens
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        if not self.use_cuda_graphs:
            return self._decode(self._encode_fn(pixels), num_beams, max_new, min_new_tokens)
        g = self._graphs_for(pixels, num_beams, max_new, min_new_tokens)
        g.pixels.copy_(pixels)
        g.encode.replay()
        g.prefix_in.copy_(g.prefix)
        g.decode.replay()
        return g.state

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

    @torch.no_grad()
    def search_many(
        self,
        batches: Iterable[torch.Tensor],
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
    ) -> Iterator[BeamState]:
        """Pipelined search over a stream of equally shaped batches, one result per batch.

        On CUDA, batch i+1 is encoded on one stream while batch i decodes on another; each
        yielded BeamState holds private copies, ready once its event has completed (reading it,
        e.g. with .tolist(), waits for it).
        """
        if not self.use_cuda_graphs:
            for px in batches:
                st = self.search(px, num_beams, max_new_tokens, min_new_tokens)
                yield st
            return
        max_new = max_new_tokens or self.model.cfg.max_caption_tokens
        K, main = num_beams, torch.cuda.current_stream(self.device)
        enc_s, dec_s = self._enc_stream, self._dec_stream
        previous: tuple[BeamState, torch.cuda.Event] | None = None
        handed_over = torch.cuda.Event()  # the encode graph's output has been copied out
        handed_over.record(main)
        for px in batches:
            px = px.to(self.device, self.dtype, non_blocking=True)
            g = self._graphs_for(px, K, max_new, min_new_tokens)
            ready = torch.cuda.Event()
            ready.record(main)
            with torch.cuda.stream(enc_s):
                enc_s.wait_event(ready)
                enc_s.wait_event(handed_over)
                px.record_stream(enc_s)
                g.pixels.copy_(px)
                g.encode.replay()
                encoded = torch.cuda.Event()
                encoded.record(enc_s)
            with torch.cuda.stream(dec_s):
                dec_s.wait_event(encoded)
                g.prefix_in.copy_(g.prefix)
                handed_over = torch.cuda.Event()
                handed_over.record(dec_s)
                g.decode.replay()
                out = g.state.copy()
                done = torch.cuda.Event()
                done.record(dec_s)
            if previous is not None:  # hand back batch i-1 while batch i decodes
                main.wait_event(previous[1])
                yield previous[0]
            previous = (out, done)
        if previous is not None:
            main.wait_event(previous[1])
            yield previous[0]
