"""Tests of components/models/."""
