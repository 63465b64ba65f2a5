"""The caregiver station: a small web app for live fall alerts, acknowledgements and outcomes."""
