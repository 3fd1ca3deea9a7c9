"""What the probes and the runner both use while a job runs: the progress callback type
(:mod:`.progress`), the torch.distributed rank helpers of a ``torchrun`` job (:mod:`.dist`),
independent chunks of work shared out over the ranks (:mod:`.chunks`), the partial results a
killed job resumes from (:mod:`.partial`), and measured working sets (:mod:`.memory`).

Nothing here imports a probe or the runner (:mod:`probe.jobs`), so both can import it.
"""
