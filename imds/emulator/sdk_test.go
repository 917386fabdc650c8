package emulator_test

import (
	"context"
	"io"
	"testing"
	"time"

	sdkimds "github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

// TestAWSSDKClient checks the emulator against the AWS SDK's own IMDS client
// (the one package imds builds on): token handling, 401 refresh, listings,
// the identity document and region.
func TestAWSSDKClient(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(3, 2, 1, 1, 1))
	base := c.base
	sdk := sdkimds.New(sdkimds.Options{Endpoint: base, ClientEnableState: sdkimds.ClientEnabled, DisableDefaultTimeout: false})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	get := func(path string) string {
		t.Helper()
		out, err := sdk.GetMetadata(ctx, &sdkimds.GetMetadataInput{Path: path})
		if err != nil {
			t.Fatalf("SDK GetMetadata %s: %v", path, err)
		}
		defer out.Content.Close()
		b, err := io.ReadAll(out.Content)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := get("network/interfaces/macs/"); got != "02:00:00:00:00:00/\n02:00:00:00:00:01/\n02:00:00:00:00:02/" {
		t.Errorf("macs/ via SDK = %q", got)
	}
	if got := get("network/interfaces/macs/02:00:00:00:00:02/local-ipv4s"); got != "10.2.0.10\n10.2.0.11" {
		t.Errorf("local-ipv4s via SDK = %q", got)
	}

	// Expired tokens: the SDK sees 401, fetches a new token and retries.
	srv.ExpireTokens()
	srv.ResetStats()
	if got := get("mac"); got != "02:00:00:00:00:00" {
		t.Errorf("mac after token expiry = %q", got)
	}
	if st := srv.Stats(); st.ByStatus[401] != 1 || st.TokenRequests != 1 {
		t.Errorf("after expiry: %d 401s and %d token requests, want 1 and 1 (%v)", st.ByStatus[401], st.TokenRequests, st.ByStatus)
	}

	// Absent keys are errors for the SDK, not empty values.
	if _, err := sdk.GetMetadata(ctx, &sdkimds.GetMetadataInput{Path: "network/interfaces/macs/02:00:00:00:00:00/network-card"}); err == nil {
		t.Error("SDK read an absent key without error")
	}

	doc, err := sdk.GetInstanceIdentityDocument(ctx, &sdkimds.GetInstanceIdentityDocumentInput{})
	if err != nil {
		t.Fatal(err)
	}
	if doc.InstanceID != "i-0123456789abcdef0" || doc.Region != "us-east-1" || doc.PrivateIP != "10.0.0.10" {
		t.Errorf("identity document = %+v", doc.InstanceIdentityDocument)
	}
	region, err := sdk.GetRegion(ctx, &sdkimds.GetRegionInput{})
	if err != nil || region.Region != "us-east-1" {
		t.Errorf("GetRegion = %+v, %v", region, err)
	}
}
