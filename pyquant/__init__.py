"""pyquant"""
