"""The job layer: one library function per command, a typed config in and a typed result out.

``cli.py`` only parses flags into a config, calls the job and prints its result; the service calls the
same functions where it runs the same work. A job never prints or exits: it raises
:class:`medadv.errors.MedadvError`, reports progress through a :class:`medadv.progress.Monitor` and hands
warnings to a ``warn`` callable (:data:`medadv.jobs.common.Warn`), which the CLI prints on stderr.

| command | job | config -> result |
|---|---|---|
| ``medadv train`` | ``medadv.jobs.train.train`` | TrainJob -> TrainResult |
| ``medadv evaluate`` | ``medadv.jobs.evaluate.evaluate`` | EvaluateJob -> EvaluateResult |
| ``medadv attack`` | ``medadv.jobs.attack.attack`` | AttackJob -> AttackResult |
| ``medadv audit`` | ``medadv.jobs.audit.audit`` | AuditJob -> StudyResult |
| ``medadv reproduce`` | ``medadv.jobs.reproduce.reproduce`` | ReproduceJob -> StudyResult |
| ``medadv demo`` | ``medadv.jobs.reproduce.demo`` | DemoJob -> StudyResult |
| ``medadv defend`` | ``medadv.jobs.defend.defend`` | DefendJob -> StudyResult |
| ``medadv certify`` | ``medadv.jobs.certify.certify`` | CertifyJob -> CertifyResult |
| ``medadv wrap`` | ``medadv.jobs.wrap.wrap`` | WrapJob -> WrapResult |
| ``medadv export`` | ``medadv.jobs.export.export`` | ExportJob -> ExportResult |
| ``medadv serve batch`` | ``medadv.serve.offline.run_batch`` | ServeBatchJob -> ServeBatchResult |

``--require-provenance`` is built by :func:`medadv.jobs.gate.provenance_gate`. The serve-batch job's
config and result live in :mod:`medadv.jobs.serve_batch`; its function lives in the service
(``medadv.serve`` sits above the jobs, so the jobs cannot import the service's analysis).

Modules are imported on use (``from medadv.jobs.attack import AttackJob, attack``): importing this package
loads no torch.
"""

from medadv.allocator import keep_freed_memory

# every job runs with glibc told to keep freed tensor memory (2.9x on EfficientNet-Lite0 at 224 px; see
# medadv.allocator): part of how medadv runs, not a step a user has to know
keep_freed_memory()
