"""Segment a whole archive on Ray: ``python -m fewshot batch``.

* ``inputs``: what to segment (a folder or a list file) as cases with stable ids;
* ``manifest``: the append-only JSON-lines record of every case, and what a re-run may skip;
* ``worker``: one engine per Ray worker, built once over a bank pinned to one committed state;
* ``pool``: workers kept warm between the batches of one driver (``run_batch(..., pool=...)``);
* ``runner``: Ray (a local one, or a cluster's), a batch's workers, dispatch, progress, Ctrl-C;
* ``cli``: the command line.

Workers only read the bank: the batch is segmented against the bank generation the driver read at
its start (``SupportBank.snapshot``), recorded beside every case.
"""
