"""Entitlement service: tiers, limits, expiry and downgrade; decides every JobRequested."""
