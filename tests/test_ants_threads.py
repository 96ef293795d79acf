"""ANTs' thread count in a process (``workers.pin_ants_threads``): registrations that run in the calling
process (``transfer.workers: 1``, or the jobs a stopped pool left) must repeat exactly, as the workers' do.

Unpinned, ANTs' ITK took the machine's cores, and its Mattes affine differed from run to run on the same
pair; a hippocampus query of ``tests/test_eval_runner.py`` scored Dice 0.69 here and 0.20 on CI.
Each check runs in a fresh interpreter: ITK fixes the count the first time ANTs runs in a process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import shared_dataset

CHECK = textwrap.dedent("""
    import logging, sys
    import nibabel as nib
    import numpy as np
    from fewshot.config import load_preset
    from fewshot.transfer import workers
    from fewshot.transfer.atlas import AtlasTransfer
    from fewshot.transfer.atlas_registration import AffineLevels, affine
    from fewshot.transfer.workers import Job

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    step = AtlasTransfer(dict(load_preset("classic")["transfer"], workers=1))
    # The inline path pins ANTs to threads_per_worker (1) before its first job runs.
    step._run({"probe": Job(int, ("7",))}, lambda key, result: None, lambda key, exc: None)
    print("pinned", workers._ants_threads)

    data = sys.argv[1]
    fixed, moving = (nib.load(f"{data}/image_{case}.nii.gz").get_fdata().astype(np.float32) for case in ("199", "015"))
    runs = [np.asarray(affine(fixed, (1.0,) * 3, moving, (1.0,) * 3, AffineLevels((8, 4), 100, 0.2)).GetParameters())
            for _ in range(3)]
    print("largest difference", max(float(np.abs(r - runs[0]).max()) for r in runs))
    print("asked for 2", workers.pin_ants_threads(2))
    print("asked for 1 again", workers.pin_ants_threads(1))
""")


def test_inline_registrations_pin_ants_to_one_thread_and_repeat_exactly():
    data = shared_dataset("msd-hippocampus")
    # What a 2-core machine gives ANTs when nothing pins it, set before the process starts.
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="2")
    done = subprocess.run([sys.executable, "-c", CHECK, str(data)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "pinned 1" in lines
    assert "largest difference 0.0" in lines  # bit for bit; with 2 threads runs differed by up to 4e-6
    # The first pin holds for the process; a later caller is told the count in force, and one asking
    # for a single thread it cannot have is warned (once) that its results will not repeat.
    assert "asked for 2 1" in lines and "asked for 1 again 1" in lines
    assert not [line for line in lines if line.startswith("WARNING")]


def test_a_single_thread_asked_for_after_another_count_is_warned_once():
    script = textwrap.dedent("""
        import logging, sys
        from fewshot.transfer import workers
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
        print(workers.pin_ants_threads(2), workers.pin_ants_threads(1), workers.pin_ants_threads(1))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "2 2 2"
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "2 ITK threads" in warnings[0] and "will not repeat" in warnings[0]
