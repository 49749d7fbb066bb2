"""txmail's Kubernetes operator: reconciles DedicatedIP, SmtpToken and TransactionalEmail."""
