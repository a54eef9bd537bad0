"""Edge devices: profiles, the device agent and the emulated fleet."""
