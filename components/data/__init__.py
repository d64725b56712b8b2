"""The data the stages meet through: the artifacts contract (`artifacts`: every DVC output's file
names, readers and writers), files written atomically and read safely (`files`), where sources
live (`locations`), the source readers (`readers`) and their tally (`rows`), the row rules
(`cleaning`) and the split (`splits`)."""
