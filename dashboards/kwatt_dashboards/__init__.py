"""kwatt's Grafana dashboards and Prometheus rules, as code."""
