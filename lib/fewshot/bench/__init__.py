"""``python -m fewshot bench``: how long the engine takes, stage by stage, and how much memory it holds.

What is timed, on the real architectures (or on the tiny random ones with ``--quick``):

* **stages**: engine.segment on a few slices around the organs, per SAM 2 input size, split into the
  engine's own stage timers (prepare+embed, retrieve, match, query encode, memory attention+decode,
  memory encode, post-processing, other);
* **memories**: the transfer step for one query slice with k supports whose SAM 2 memories are cached
  in the bank, versus re-encoding every support for every query (the retrieval seed paper's way,
  ``Sam2Transfer.segment_slice_reencoding``), for each k and size;
* **whole path vs k**: engine.segment per slice at each k (all labels at once, as the tool runs);
* **whole volume** (at the preset's own size): ingestion of one labelled volume, segmentation of
  another, a second segmentation of the same image with the bank unchanged (the finished result is
  returned) and another after the bank changed (cached image features, everything else redone; the
  ">= 5x" target is judged on this one), network vs non-network time (forward hooks on every
  nn.Module), peak RSS;
* **retrieval scale**: faiss latency, recall@16 against exact search (1000 queries, with a 95 %
  confidence interval) and build time for banks of
  synthetic clustered vectors of the embedder's dimension, indexed by ``bank.build_index`` exactly
  as the SupportBank indexes its entries.

With ``--preset classic`` (no networks, registration on the canvas) there is one size, the canvas;
the stages are the classic path's (descriptor, NCC, registration and fusion in the worker pool,
3D consistency), the memories comparison and the SAM 2 / network targets do not apply and say so.

Random weights time the same as real ones: cost depends on shapes, not on weight values.
Everything lands in ``OUT/bench.json`` (rewritten after each section, so a long run that is stopped
keeps what it measured) plus PNG plots; every figure the issue sets a target for is compared to it.

Rooms: ``plan`` (what is timed, on which data), ``runs`` (one engine call timed), ``memories``,
``sizes`` (everything at one input size), ``retrieval`` (faiss at scale), ``targets`` (the issue's
targets, the guide, the recommendation) and ``report`` (``run_bench``, bench.json and the plots,
drawn by ``fewshot.plots``). The engine is driven through its public API only
(``Engine.segment(..., options=SegmentOptions)``, ``Engine.forget_caches``, ``SupportBank.mark_changed``).
"""
