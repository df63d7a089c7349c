"""``fastem.Adapter``: continual adaptation over a stream of utterances, with a safety reset.

The same front door and pipeline as :func:`fastem.adapt` (a recording over 30 s is cut into windows,
each window one pass with ``B = 1``), keeping the adapted parameters and the optimizer state from one
window to the next: a stream from one microphone, room or speaker is one domain, and
what was learnt on one utterance helps the next.  Entropy minimization run for long can drift into
collapse (confident repetition, empty output), so each call is checked against the **source** model
(its unadapted transcript, ``text_before``, is the source model's, however much the adapter has learnt;
judged against the adapter's own drifted transcript, the guards would never see the drift):

* a window whose adapted transcript a guard rejects returns the source model's transcript and is
  **rolled back** (parameters and optimizer state as they were before the window; with
  ``rollback=False`` what it learnt is kept, only its transcript is refused);
* after ``reset_after`` rejected windows in a row, or when any value becomes non-finite, the adapter
  **resets** to the source weights with a fresh optimizer (``resets`` counts them);
* with ``anchor=a`` (0 by default), after each window whose update is kept every adapted value moves the
  fraction ``a`` of the way back to the source model's value: what was learnt decays geometrically unless
  the stream keeps teaching it, so the adapter stays within about ``lr / a`` of the source per value
  (entropy minimization left to run over a stream otherwise drifts until it collapses).

With LayerNorm parameter sets the adapted values live in the adapter (the user's model is never
written); with other sets the model adapts in place and :meth:`Adapter.close` (or leaving the ``with``
block) restores it bit-for-bit.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .adapt import _Exclusive, _prepare_inputs, _run, _run_recordings
from .config import AdaptConfig, AdaptResult
from .loop import State, make_optimizer
from .params import Binding, ModelSnapshot, select_parameters

__all__ = ["Adapter"]


class Adapter:
    """Adapt continually across calls; ``reset()`` goes back to the source model.

    >>> with fastem.Adapter(model, processor) as adapter:
    ...     for clip in stream:
    ...         print(adapter.adapt(clip).text)
    """

    def __init__(self, model, processor=None, config: AdaptConfig | None = None, *, reset_after: int = 2,
                 rollback: bool = True, anchor: float = 0.0, **overrides):
        self.config = dataclasses.replace(config or AdaptConfig(), **overrides)
        if reset_after < 1:
            raise ValueError(f"reset_after must be >= 1, got {reset_after!r}")
        if not 0.0 <= anchor < 1.0:
            raise ValueError(f"anchor must be in [0, 1), got {anchor!r}")
        self.anchor = float(anchor)
        self.model = model
        self.processor = processor
        self.reset_after = reset_after
        self.rollback = rollback
        self.named = select_parameters(model, self.config.params)
        self.resets = 0
        self.rollbacks = 0
        self.calls = 0
        self._rejected_in_a_row = 0
        self._state: State | None = None
        self._closed = False
        with _Exclusive(model):  # not while another thread adapts the model: the snapshot is the source model
            self.snapshot = ModelSnapshot(model, [p for _, p in self.named])
            self._reset(count=False)

    # -- state -------------------------------------------------------------------------------------
    def reset(self, *, count: bool = True) -> None:
        """Back to the source weights, with a fresh optimizer."""
        self._check_open()
        with _Exclusive(self.model):
            self._reset(count=count)

    def _reset(self, *, count: bool = True) -> None:
        self.snapshot.restore()
        binding = Binding(self.model, self.named, 1)
        self._state = State(binding=binding, optimizer=make_optimizer(self.config, binding.tensors),
                            source=self.snapshot if binding.direct else None)
        self._source_values = binding.rows()
        self._rejected_in_a_row = 0
        if count:
            self.resets += 1

    def _save(self):
        state = self._state
        return state.binding.rows(), copy.deepcopy(state.optimizer.state_dict()), state.steps_taken

    def _rollback(self, saved) -> None:
        values, opt, steps = saved
        state = self._state
        state.binding.undo(values, torch.ones(1, dtype=torch.bool))
        state.optimizer.load_state_dict(opt)
        state.steps_taken = steps

    def state_dict(self) -> dict:
        """What this adapter has learnt so far (adapted values, optimizer state, counters), to resume a
        stream in another process with :meth:`load_state_dict` on an adapter made the same way."""
        self._check_open()
        with _Exclusive(self.model):
            values, opt, steps = self._save()
        return {"values": values, "optimizer": opt, "steps_taken": steps,
                "counters": {"calls": self.calls, "rollbacks": self.rollbacks, "resets": self.resets,
                             "rejected_in_a_row": self._rejected_in_a_row}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of an adapter with the same model, parameter set and config."""
        self._check_open()
        with _Exclusive(self.model):
            self._load(state)

    def _load(self, state: dict) -> None:
        values = state["values"]
        mine = self._state.binding.tensors
        if len(values) != len(mine) or any(tuple(v.shape) != tuple(t.shape) for v, t in zip(values, mine)):
            raise ValueError("this state was saved by an adapter with other adapted parameters "
                             f"({[tuple(v.shape) for v in values][:3]}... vs {[tuple(t.shape) for t in mine][:3]}...)")
        if not all(bool(torch.isfinite(v).all()) for v in values):
            raise ValueError("this state holds non-finite values")
        values = [v.to(device=t.device, dtype=t.dtype) for v, t in zip(values, mine)]
        self._rollback((values, state["optimizer"], int(state["steps_taken"])))
        counters = state.get("counters", {})
        self.calls = int(counters.get("calls", 0))
        self.rollbacks = int(counters.get("rollbacks", 0))
        self.resets = int(counters.get("resets", 0))
        self._rejected_in_a_row = int(counters.get("rejected_in_a_row", 0))

    def _finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self._state.binding.tensors)

    # -- use ---------------------------------------------------------------------------------------
    def adapt(self, audio, *, sampling_rate: int | None = 16000, language: str | None = None) -> AdaptResult:
        """Adapt on one more utterance (or recording) of the stream and return its transcripts (see
        :class:`fastem.AdaptResult`); a recording over 30 s is adapted window by window, in order."""
        self._check_open()
        with _Exclusive(self.model):
            processor, items, languages, inputs = _prepare_inputs(self.model, self.processor, [audio], sampling_rate,
                                                                  language)
            self.processor = processor
            return _run_recordings(self.model, processor, items, languages, self.config, 1, run=self._window,
                                   inputs=inputs)[0]

    def _window(self, model, processor, waves, languages, cfg, inputs) -> list[AdaptResult]:
        """One window through the pipeline with this adapter's state, then rollback and reset as the judge says."""
        saved = self._save()
        try:
            result = _run(model, processor, waves, languages, cfg, self._state, inputs)[0]
        except BaseException:
            self._rollback(saved)
            raise
        self.calls += 1
        skipped = any(h.get("skipped") for h in result.history)
        rejected = result.guard is not None or skipped
        rolled_back = rejected and (self.rollback or skipped)
        if rolled_back:
            self._rollback(saved)
            self.rollbacks += 1
        self._rejected_in_a_row = self._rejected_in_a_row + 1 if rejected else 0
        if self.anchor and result.history and not rolled_back:  # an update was kept
            self._state.binding.pull_toward(self._source_values, self.anchor)
        if self._rejected_in_a_row >= self.reset_after or skipped or not self._finite():
            self._reset()
            result.scores["reset"] = True
        return [result]

    def close(self) -> None:
        """Put the model back exactly as it was when the adapter was made."""
        if not self._closed:
            with _Exclusive(self.model):  # not in the middle of another thread's call on the model
                self.snapshot.restore()
                self._closed = True

    def _check_open(self):
        if getattr(self, "_closed", False):
            raise RuntimeError("this Adapter is closed; make a new one")

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
