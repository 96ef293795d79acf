"""Active learning: propose the unlabelled image the support bank covers worst.

Each slice of a candidate image is compared with its nearest support-bank entry (the same
embedding space and index the engine retrieves from); the image's score is the mean over its
slices of ``1 - similarity``. The highest score is the image whose anatomy the bank has least
examples of, so labelling it helps the next inferences most.

With an empty bank there is nothing to be far from: the strategy proposes the most typical image
instead (the one whose mean slice embedding is closest to the other candidates'), so the first
label is a representative example rather than an outlier.
"""
from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from fewshot.coverage import propose
from lib.embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)


class BankCoverage(Strategy):
    def __init__(self, host, cache: EmbeddingCache):
        super().__init__("Unlabelled image whose slices the few-shot support bank covers worst")
        self.host = host
        self.cache = cache

    def candidates(self, datastore: Datastore) -> dict[str, str]:
        """Unlabelled image id -> image path."""
        out = {}
        for image_id in sorted(datastore.get_unlabeled_images()):
            path = datastore.get_image_uri(image_id)
            if path:
                out[image_id] = path
        return out

    def __call__(self, request, datastore: Datastore):
        start = time.perf_counter()
        candidates = self.candidates(datastore)
        if not candidates:
            logger.info("bank_coverage: every image is labelled")
            return None
        embeddings = {}
        for image_id, path in candidates.items():
            try:
                embeddings[image_id] = self.cache.get(path)
            except Exception as exc:  # an unreadable image is skipped, not proposed
                logger.warning("bank_coverage: %r skipped: %s", image_id, exc)
        if not embeddings:
            return None
        proposal = propose(self.host.engine.bank, embeddings)  # the bank locks its own index
        chosen, score, reason = proposal.image_id, proposal.score, proposal.reason
        logger.info(
            "bank_coverage: %r (%s, score %.4f) among %d unlabelled images in %.2f s",
            chosen, reason, score, len(embeddings), time.perf_counter() - start,
        )
        return {"id": chosen, "score": round(score, 6), "reason": reason}

    # ------------------------------------------------------------------ background warm-up

    def warm_step(self, datastore: Datastore) -> bool:
        """Embed one unlabelled image not yet cached; True while more remain (an idle task)."""
        for image_id, path in self.candidates(datastore).items():
            try:
                if self.cache.has(path):
                    continue
                self.cache.get(path)
                logger.info("bank_coverage: cached slice embeddings of %r", image_id)
            except Exception as exc:
                logger.warning("bank_coverage: cannot embed %r: %s", image_id, exc)
                continue
            return True
        return False
