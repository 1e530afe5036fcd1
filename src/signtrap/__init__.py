"""signtrap: a testbed for backdoor (data-poisoning) attacks on traffic-sign classifiers."""
__version__ = "0.1.0"
