"""SMTP submission: aiosmtpd's protocol and handler, AUTH, TLS, complaints."""
