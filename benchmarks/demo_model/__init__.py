"""The synthetic visual QA task behind the shipped demo model: data, training and evaluation."""
