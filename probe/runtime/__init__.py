"""What the probes and the runner both use while a job runs: the progress callback type
(:mod:`.progress`), the torch.distributed rank helpers of a ``torchrun`` job (:mod:`.dist`),
independent chunks of work shared out over the ranks (:mod:`.chunks`), the partial results a
killed job resumes from (:mod:`.partial`), measured working sets and out-of-memory errors
(:mod:`.memory`), and float32 arithmetic without TF32 for the probes that promise its accuracy
(:mod:`.precision`).

Nothing here imports a probe or the runner (:mod:`probe.jobs`), so both can import it.
"""
