"""What bench/run_lab.py and bench/run_functions.py share about a run: how long and how
often to measure (``--quick`` or not), and a workdir that is removed afterwards."""
import shutil
import tempfile


def timing(args):
    """Plan fields for the repetitions, load-run length, re-runs and idle waits."""
    return {"repetitions": 1 if args.quick else args.repetitions,
            "seconds": 3 if args.quick else args.seconds,
            "retries": 0 if args.quick else 1, "patience": 10.0,
            "extra_budget": 15.0 if args.quick else 60.0}


def run_in_workdir(run, make_plan, prefix, keep):
    """Calls run(make_plan(workdir)) with a fresh workdir, removed afterwards unless keep."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        return run(make_plan(workdir))
    finally:
        if keep:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
