"""What the payment-push services share: settings, logging, clients, model and wire format."""
