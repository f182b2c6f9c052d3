"""The steering strength search: per (arm, direction), the strongest alpha that keeps coherence.

A fixed grid of strengths has to be guessed before the run: the first PersonaWorld grids stopped
at +8 while misalignment was still rising, and on another machine's numerics the same latent
went from coherent at +4 to broken at +5, so a grid tuned on one build misses on the next. The
search asks the question the study asks instead. Steering harder moves misalignment further
until the model stops answering coherently; so for each (arm, direction) it bisects the
strengths between 0 and the arm's ``max_alpha`` for the boundary where coherence falls below
the arm's floor (:func:`emergent.studies.persona.steering.arm_floor`), within ``search_trials`` trials.
The best setting is then chosen among all the arm's trials as for a grid (the strongest effect
whose coherence keeps the floor), so an effect that peaks before the boundary is still found.
The bisection assumes that coherence falls as the strength grows; where it does not, the
trials it ran are all in the table and the plot.

:func:`next_strength` is the bisection (pure); :class:`StrengthSearch` is the Ray Tune
``Searcher`` that runs one bisection per (arm, direction) in one Tune run, the arms' unsteered
trials and any fixed strengths first. Lines run in parallel as the trial resources allow; each
line is sequential, so the trials (and, with seeded sampling, their results) are the same on
every run.
"""

from __future__ import annotations

import pickle

from ray.tune.search import Searcher  # noqa: TID253


def next_strength(seen: dict[float, bool], bound: float, left: int, tol: float) -> float | None:
    """The next strength magnitude to try on one line, or None when the line is done.

    ``seen`` maps each magnitude tried (|alpha|) to whether its coherence kept the floor;
    ``bound`` is the largest magnitude allowed; ``left`` the trials left; the line stops once
    the boundary is bracketed within ``tol``. The bracket is [largest kept, smallest broken
    above it]; with nothing broken yet the bound itself is tried (if it keeps the floor, so
    does the whole range, under the search's assumption)."""
    if left <= 0:
        return None
    lo = max((m for m, kept in seen.items() if kept), default=0.0)
    if lo >= bound:
        return None
    hi = min((m for m, kept in seen.items() if not kept and m > lo), default=None)
    if hi is None:
        return bound
    if hi - lo <= tol:
        return None
    return (lo + hi) / 2


class StrengthSearch(Searcher):
    """A Tune searcher over steering settings ``{"setting": {arm, direction, alpha}}``.

    ``fixed``: settings tried first (each arm's unsteered one, any fixed strengths). ``lines``:
    ``(arm, direction, max_alpha, trials)``, one bisection each (the alphas' sign is
    ``max_alpha``'s). ``kept(rows, setting)`` says whether a completed setting kept its arm's
    coherence floor, given the completed rows (dicts: the setting and its trial's metrics); a
    line starts once its arm's unsteered trial and its fixed strengths are done."""

    def __init__(self, fixed: list[dict], lines: list[tuple], kept, tol_fraction: float = 1 / 64):
        super().__init__()
        self.queue = [dict(s) for s in fixed]
        self.lines = {(a, d): (float(bound), int(n)) for a, d, bound, n in lines}
        self.kept = kept
        self.tol_fraction = tol_fraction
        self.rows: dict[str, dict] = {}
        """Completed trials by trial id: the setting and its metrics (or ``error``)."""
        self.running: dict[str, dict] = {}
        self.searched: dict[str, tuple] = {}
        """Trial ids the bisection proposed, with their line."""
        self.stopped: set[tuple] = set()

    @staticmethod
    def budget(fixed: list[dict], lines: list[tuple]) -> int:
        """The most trials the search can run (Tune's ``num_samples``)."""
        return len(fixed) + sum(int(n) for *_, n in lines)

    def _waiting(self, arm: str, direction: str) -> bool:
        """Whether the line waits for a fixed trial of its own or its arm's unsteered one."""
        for s in [*self.queue, *self.running.values()]:
            if s["arm"] == arm and s["direction"] in (direction, "none"):
                return True
        return False

    def _next(self, line: tuple) -> float | None:
        arm, direction = line
        bound, n = self.lines[line]
        rows = [r for r in self.rows.values() if "error" not in r]
        seen = {}
        for r in rows:
            if r["arm"] == arm and r["direction"] == direction and r["alpha"] * bound > 0:
                seen[abs(r["alpha"])] = bool(self.kept(rows, r))
        left = n - sum(1 for ln in self.searched.values() if ln == line)
        m = next_strength(seen, abs(bound), left, abs(bound) * self.tol_fraction)
        return None if m is None else m if bound > 0 else -m

    def suggest(self, trial_id: str):
        if self.queue:
            s = self.queue.pop(0)
        else:
            s = None
            for line in self.lines:
                if line in self.stopped or self._waiting(*line):
                    continue
                alpha = self._next(line)
                if alpha is None:
                    self.stopped.add(line)
                    continue
                s = {"arm": line[0], "direction": line[1], "alpha": float(alpha)}
                self.searched[trial_id] = line
                break
            if s is None:
                return Searcher.FINISHED if not self.running else None
        self.running[trial_id] = s
        return {"setting": dict(s)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        s = self.running.pop(trial_id, None) or self.rows.get(trial_id)
        if s is None:
            return
        setting = {k: s[k] for k in ("arm", "direction", "alpha")}
        if error or not result:
            # the job fails on an errored trial; stop its line instead of retrying the strength
            self.rows[trial_id] = setting | {"error": True}
            if trial_id in self.searched:
                self.stopped.add(self.searched[trial_id])
            return
        self.rows[trial_id] = setting | {k: v for k, v in result.items() if not k.startswith("q/")}

    def get_state(self) -> dict:
        keys = ("queue", "rows", "running", "searched", "stopped")
        return {k: getattr(self, k) for k in keys}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
