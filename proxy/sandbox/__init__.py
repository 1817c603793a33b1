"""A throwaway PostgreSQL and the generated customer-support database: what the demo runs on
(and the tests and benchmarks too, which import it from here; the product never imports
``loadtests``)."""
