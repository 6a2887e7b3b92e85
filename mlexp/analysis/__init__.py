"""Reading runs back: queries, statistics, paired comparisons, answers in words, tables, plots, feature similarity and the monitor."""
