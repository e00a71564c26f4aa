"""calib"""
