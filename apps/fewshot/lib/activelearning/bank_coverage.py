"""Active learning: propose the unlabelled image the support bank covers worst.

Each slice of a candidate image is compared with its nearest support-bank entry (the same
embedding space and index the engine retrieves from); the image's score is the mean over its
slices of ``1 - similarity``. The highest score is the image whose anatomy the bank has least
examples of, so labelling it helps the next inferences most.

With an empty bank there is nothing to be far from: the strategy proposes the most typical image
instead (the one whose mean slice embedding is closest to the other candidates'), so the first
label is a representative example rather than an outlier.

A request never runs the embedder: it scores the candidates whose slice embeddings the background
warm-up has cached, and names the others as ``warming``. Before any is cached it proposes the
first unlabelled image in id order (MONAI Label's ``first``).
"""
from __future__ import annotations

import logging
import os
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)


class BankCoverage(Strategy):
    def __init__(self, host, cache: EmbeddingCache):
        super().__init__("Unlabelled image whose slices the few-shot support bank covers worst")
        self.host = host
        self.cache = cache
        self._unusable: dict[str, tuple[tuple, str]] = {}  # image path -> (file stamp, why it cannot be embedded)
        self._unfetchable: dict[str, str] = {}  # image id -> why a remote datastore could not download it

    def candidates(self, datastore: Datastore) -> dict[str, str | None]:
        """Unlabelled image id -> image path; None for a series a DICOMweb datastore has not
        downloaded yet (its ``local_image_uri`` never fetches: a request must not download)."""
        local = getattr(datastore, "local_image_uri", None)
        out = {}
        for image_id in sorted(datastore.get_unlabeled_images()):
            path = local(image_id) if local else datastore.get_image_uri(image_id)
            if path or local:
                out[image_id] = path or None
        return out

    @staticmethod
    def _stamp(path: str) -> tuple:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def _is_unusable(self, path: str) -> bool:
        hit = self._unusable.get(path)
        try:
            return hit is not None and hit[0] == self._stamp(path)
        except OSError:
            return True

    def __call__(self, request, datastore: Datastore):
        start = time.perf_counter()
        candidates = self.candidates(datastore)
        if not candidates:
            logger.info("bank_coverage: every image is labelled")
            return None
        embeddings, warming, unusable = {}, [], []
        for image_id, path in candidates.items():
            if path is None:
                (unusable if image_id in self._unfetchable else warming).append(image_id)
                continue
            if self._is_unusable(path):
                unusable.append(image_id)
                continue
            try:
                vectors = self.cache.load(path)
            except OSError as exc:
                logger.warning("bank_coverage: %r skipped: %s", image_id, exc)
                unusable.append(image_id)
                continue
            if vectors is None:
                warming.append(image_id)
            else:
                embeddings[image_id] = vectors
        if embeddings:
            proposal = self.host.propose(embeddings)
            result = {"id": proposal.image_id, "score": round(proposal.score, 6), "reason": proposal.reason}
        else:
            order = [i for i in candidates if i not in unusable] or list(candidates)
            result = {"id": order[0], "score": 0.0, "reason": "slice embeddings not computed yet: first unlabelled image in id order"}
        if warming:
            result["warming"] = warming
        logger.info(
            "bank_coverage: %r (%s, score %.4f) among %d unlabelled images (%d still warming) in %.2f s",
            result["id"], result["reason"], result["score"], len(candidates), len(warming), time.perf_counter() - start,
        )
        return result

    # ------------------------------------------------------------------ background warm-up

    def warm_step(self, datastore: Datastore) -> bool:
        """Embed one unlabelled image not yet cached; True while more remain (an idle task). A
        DICOMweb datastore's series are downloaded here first, in the background."""
        for image_id, path in self.candidates(datastore).items():
            if path is None:
                if image_id in self._unfetchable:
                    continue
                try:
                    path = datastore.get_image_uri(image_id)
                except Exception as exc:  # remembered until restart: proposals list it as unusable
                    reason = getattr(exc, "detail", None) or str(exc)
                    logger.warning("bank_coverage: cannot download %r: %s", image_id, reason)
                    self._unfetchable[image_id] = reason
                    continue
            if self._is_unusable(path):
                continue
            try:
                if self.cache.has(path):
                    continue
                stamp = self._stamp(path)
            except OSError as exc:
                logger.warning("bank_coverage: cannot read %r: %s", image_id, exc)
                continue
            try:
                self.cache.get(path)
            except Exception as exc:  # remembered until the file changes: proposals skip it
                logger.warning("bank_coverage: cannot embed %r: %s", image_id, exc)
                self._unusable[path] = (stamp, str(exc))
                continue
            logger.info("bank_coverage: cached slice embeddings of %r", image_id)
            return True
        return False
