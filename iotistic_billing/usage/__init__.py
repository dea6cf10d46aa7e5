"""Usage metering: instance reports stored exactly once, rolled up per billing period, priced as overage."""
