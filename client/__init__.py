"""The home side of sshrelay: connect loop and local dialers for TCP and UDP targets."""
