"""Kubernetes-facing code; ``stages`` and ``deploy`` import it only on their cluster paths.

- ``client``: how to reach the API (explicit host, the pod's service account, kubeconfig);
- ``errors``: failed API calls as brain-ldm errors, refusals with the RBAC grant they need;
- ``resources``: typed get/create/patch/delete of one custom resource, and the "is it
  served?" probe;
- ``security``: the securityContext every pod runs under;
- ``podlog``: a pod's log copied to the component's stdout;
- ``training_job``: what both kinds of training job build alike (the pod every node runs,
  labels, name checks, the spec hash);
- ``job_launcher``: how a training job is run, whatever its kind (adoption, creation, the
  polling loop, failure reports, the RBAC rules of those calls);
- ``pytorchjob``: a training stage as a PyTorchJob (what differs: the object, its status);
- ``trainjob``: a training stage as a Kubeflow Trainer v2 TrainJob (likewise), in the
  TrainJob API of the cluster's Trainer (v2.1 or v2.2+);
- ``diagnostics``: a failed job's pod state, last log lines and events;
- ``pending``: why a pod cannot start (scheduler and kubelet marks) or was never created
  (the controller's FailedCreate events), with what to change;
- ``ownership``: a job's lifetime tied to the launchers that follow it (ownerReferences to
  their pods, takeover from ended ones, release on SIGTERM): no leaked GPUs, no job deleted
  under another run;
- ``isvc_build``: a model bundle as a KServe InferenceService (and its ServingRuntime),
  built from the config;
- ``isvc_status``: where an InferenceService's revision stands, read from its status;
- ``isvc_api``: the API calls of a rollout, and its one write form (merge patches);
- ``isvc_watch``: what KServe made of one write (status, Deployment, refusal events);
- ``isvc_rollout``: the rollout (create or canary, smoke inference, promote or roll back).
"""
