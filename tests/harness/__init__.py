"""What tests share: configs, data and bundles, emulated services (S3, Kubernetes API),
CRD validation and request builders. Test files import from here, never from each other."""
